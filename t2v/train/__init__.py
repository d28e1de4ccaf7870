"""Ray Train + DeepSpeed orchestration."""
