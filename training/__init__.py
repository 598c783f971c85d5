"""What training needs besides the model and the data: checkpoints, optimizers, auxiliary losses, domain adaptation."""
