"""Optional speed and memory techniques layered on the plain model: they change no value the model computes."""
