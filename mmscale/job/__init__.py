"""The job layer: a run assembled from a config. Above data, model, training and callbacks; below the CLIs.

    preflight   load_config / config_from_dict / problems_of: every check before any process group starts
    build       model_recipe (the one way a config's model is built), build_trainer, build_as_trained, close
    dry_run     size a job on the meta device
    runs        open_run / load_run / build_from_checkpoint: a run or checkpoint with the config recorded for it
"""
