"""The training stages (autoencoder, neural operator, diffusion UNet; Optuna sweeps tracked in MLflow) and evaluation."""
