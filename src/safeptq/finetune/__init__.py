"""Fine-tuning: supervised fine-tuning and the model organism (aligned / attacked)."""

from .organism import OrganismRecipe, build_organism
from .sft import SFTConfig, supervised_finetune

__all__ = ["OrganismRecipe", "build_organism", "SFTConfig", "supervised_finetune"]
