"""Our PPO engine for language models: the maths (`algorithm`), the Ray worker loop (`worker`), the driver (`driver`)."""
