"""A tiny ZeRO-3 run whose ranks see different media: started by tests/test_media_zero3.py on 2 ranks or 1 process.

    run_media.py OUT_JSON section.key=value ...

Global batch k (8 samples, cut into micro batches of 4 in order) is [4 videos | 4 text-only samples] for even k and
[4 text-only | 4 videos] for odd k: on 2 ranks, rank 0's batches hold only videos and rank 1's only text, then the
other way round; one process sees the same micro batches in turn (2 accumulation steps). Writes rank 0's logged
records to OUT_JSON.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from mmscale.data import load_tokenizer
from mmscale.data.collate import collate_samples
from mmscale.data.decode import decode_for_training
from mmscale.data.media_demo import make_video_sample
from mmscale.job.build import build_trainer, close
from mmscale.job.preflight import load_config
from mmscale.media import bind_media
from mmscale.training.engine import init_distributed

TEXTS = ["a red circle moves left", "a blue square moves up", "hello world", "one two three four"]


class MixedMedia:
    """This rank's micro batches of the global batches described above (endless)."""

    def __init__(self, cfg, rank: int, world: int):
        tok = load_tokenizer(cfg.data.tokenizer)
        media = bind_media(cfg, tok)
        self.rank, self.world = rank, world
        self.accum = cfg.train.global_batch_size // (cfg.train.micro_batch_size * world)

        def micro(kind: str, k: int) -> dict:
            raws = [({**make_video_sample(8 * k + i, 0, frames=4, size=32), "__key__": f"v{k}.{i}"} if kind == "video"
                     else {"__key__": f"t{k}.{i}", "txt": TEXTS[(k + i) % len(TEXTS)].encode()}) for i in range(4)]
            samples = [decode_for_training(r, cfg.data, tok, 0, media) for r in raws]
            return collate_samples(samples, pad_id=tok.pad_id, image_token_id=tok.image_token_id, max_images=1,
                                   seq_len=1 + cfg.data.max_text_len, media=media, image_shape=(3, 32, 32))

        self.global_batches = [[micro("video", k), micro("text", k)] if k % 2 == 0 else
                               [micro("text", k), micro("video", k)] for k in range(cfg.train.max_steps)]

    def state_dict(self):
        return {}

    def load_state_dict(self, sd):
        pass

    def __iter__(self):
        for micros in self.global_batches:
            for g in range(self.accum):
                yield micros[g * self.world + self.rank]


def main() -> int:
    out, *overrides = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    cfg = load_config(Path(__file__).resolve().parents[2] / "configs/tiny.yaml", overrides)
    rank, world = init_distributed()
    trainer = build_trainer(cfg, train_data=MixedMedia(cfg, rank, world))
    history = trainer.train()
    if rank == 0:
        Path(out).write_text(json.dumps({"world_size": world, "history": history}))
    close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
