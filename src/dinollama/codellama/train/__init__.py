"""Code Llama training recipes: FIM code pre-training, long-context fine-tuning, instruction tuning, LoRA."""

from .data import pack, prepare_corpus, prepare_dialogs, read_documents, train_tokenizer
from .fim import document_tokens, fim_split, fim_tokens
from .lora import LoRALinear, apply_lora, merge_lora
from .sft import IGNORE, dialog_tokens
from .trainer import CodeTrainConfig, CodeTrainer, with_context

__all__ = [
    "CodeTrainConfig", "CodeTrainer", "IGNORE", "LoRALinear", "apply_lora", "dialog_tokens", "document_tokens",
    "fim_split", "fim_tokens", "merge_lora", "pack", "prepare_corpus", "prepare_dialogs", "read_documents",
    "train_tokenizer", "with_context",
]
