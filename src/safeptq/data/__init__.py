"""Datasets: the prompt-set registry, readers for user files, and chat formatting."""

from .chat import format_chat, format_chats
from .records import Example, PromptSet
from .registry import (AGNEWS_LABELS, REGISTRY, SST2_LABELS, data_dir_candidates, list_prompt_sets,
                       load_prompt_set)

__all__ = ["Example", "PromptSet", "REGISTRY", "load_prompt_set", "list_prompt_sets",
           "data_dir_candidates", "format_chat", "format_chats", "SST2_LABELS", "AGNEWS_LABELS"]
