"""Training: the config, the real Fashion-MNIST files, the data pipelines, the network, its sizes and
the loop `train(cfg)`. Nothing here imports MLflow or Optuna."""
