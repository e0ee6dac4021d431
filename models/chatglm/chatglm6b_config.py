"""ChatGLM-6B's configuration (spec section 1), as a transformers config class."""

from __future__ import annotations

from transformers import PreTrainedConfig


class ChatGLMConfig(PreTrainedConfig):
    """The fields of ChatGLM-6B's `config.json`; defaults are the released 6B checkpoint's."""

    model_type = "chatglm"
    attribute_map = {  # noqa: RUF012 - transformers reads this class attribute
        "num_hidden_layers": "num_layers",
        "max_position_embeddings": "max_sequence_length",
    }

    vocab_size: int = 130528
    hidden_size: int = 4096
    inner_hidden_size: int = 16384
    num_layers: int = 28
    num_attention_heads: int = 32
    layernorm_epsilon: float = 1e-5
    max_sequence_length: int = 2048
    position_encoding_2d: bool = True
    bos_token_id: int | None = 130004
    eos_token_id: int | list[int] | None = 130005
    mask_token_id: int = 130000
    gmask_token_id: int = 130001
    pad_token_id: int | None = 3
    use_cache: bool = True
    quantization_bit: int = 0
    pre_seq_len: int | None = None
    prefix_projection: bool = False
    tie_word_embeddings: bool = True
