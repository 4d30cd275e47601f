"""Distillation of a mixture of teachers into one student: prompt/response data
(`data`), the models read as hidden states and heads (`models`), the training loop
(`train`) and the checkpoint-to-checkpoint run behind `modkern distill` (`run`)."""
