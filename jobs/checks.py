"""Checks of the training commands' settings that need more than the config: the encoder the
workers will build (`model_config`: `model.overrides` and neighbour init against BertConfig's own
rules) and a sequence length against the model's position table (`check_seq_len`), on the driver
before Ray starts. Every setting's own type and range is checked by pipelines.settings (the one
walker, at every source)."""

from __future__ import annotations

from pipelines import UserError
from pipelines.training.config import ModelConfig


def model_config(model: ModelConfig, vocab_size: int):
    """The encoder config the workers will build (pipelines.training.engine.build_bert_config), here on the
    driver; a `model.overrides` key BertConfig doesn't have, or a value it refuses (a 0-wide
    layer, a dropout of 1.5, an activation it lacks: `BertConfig.check`), or neighbour init on a
    model it can't apply to, is a ValueError naming it."""
    from bert_core.init import check_neighbour_init
    from pipelines.training.engine import build_bert_config

    try:
        config = build_bert_config(model, vocab_size)
    except TypeError as e:  # BertConfig(**overrides) with an unknown key
        raise UserError(f"model.overrides {sorted(model.overrides)}: {e}; use BertConfig's field names "
                         f"(hidden_size, max_position_embeddings, ...)") from None
    except ValueError as e:  # a value no model can be built from (BertConfig.check): every worker would fail
        source = "model.overrides" if model.overrides else f"preset {model.preset!r}"
        raise UserError(f"{source}: {e}") from None
    if model.init == "neighbour" and not model.init_from:  # fresh weights: every worker would fail
        try:
            check_neighbour_init(config)
        except ValueError as e:
            raise UserError(f"model.init 'neighbour': {e}; use model.init 'bert' for this model") from None
    return config


def check_seq_len(key: str, value: int, bert_config, model: ModelConfig) -> None:
    """Refuse a sequence length (`key` = `value`) past the model's position table: its positions
    beyond would index no embedding, and every worker would fail on its first batch."""
    limit = bert_config.max_position_embeddings
    if value <= limit:
        return
    if model.init_from:
        source = f"the --init-from checkpoint {model.init_from}"
    else:
        source = f"preset {model.preset!r}"
    if "max_position_embeddings" in model.overrides:
        source += " with model.overrides.max_position_embeddings"
    fresh = "" if model.init_from else " (or, for fresh weights, set model.overrides.max_position_embeddings)"
    raise UserError(f"{key} {value} is longer than the model's max_position_embeddings {limit} ({source}): "
                     f"a row's positions after the first {limit} have no embedding. Use {key} <= {limit}{fresh}")
