"""LoRA training on a worker: the task (``workers.training.task``, ``farm.train_lora``) and the loop
(``workers.training.loop``). The light side is ``farm.training``."""
