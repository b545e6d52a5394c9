"""Bidirectional encoders (BERT, RoBERTa / XLM-RoBERTa, ModernBERT) for embedding models: hidden states with
transformers' parameter names, loaded from and saved to Hugging Face checkpoint directories."""
from .base import EncoderModel
from .loader import encoder_model_types, load_encoder, save_encoder

__all__ = ["EncoderModel", "encoder_model_types", "load_encoder", "save_encoder"]
