"""Three-phase dynamic distillation of a pruned student towards its teacher: data, losses,
phases, the trainer, evaluation."""
