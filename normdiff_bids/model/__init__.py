"""The conditional diffusion model: schedules, samplers, backbones, covariate encoders, bundle I/O."""
