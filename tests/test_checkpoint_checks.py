"""bert_core.check_checkpoint: the cheap, driver-side validation every job runs on a model
directory before it starts any work (no Ray here)."""

import json
import os

import pytest
import torch

from bert_core import BertForMaskedLM, preset, save_pretrained
from bert_core.checkpoint import check_checkpoint, load_pretrained


@pytest.fixture()
def good(tmp_path):
    model = BertForMaskedLM(preset("debug", vocab_size=100))
    save_pretrained(model, tmp_path / "good")
    return tmp_path / "good", model


def _copy_config(src, dst, **changes):
    dst.mkdir()
    cfg = json.loads((src / "config.json").read_text()) | changes
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_good_checkpoint_returns_its_config(good):
    path, _ = good
    assert check_checkpoint(path).vocab_size == 100


def test_refusals_name_the_path_and_the_fix(good, tmp_path):
    path, _ = good
    with pytest.raises(FileNotFoundError, match="no config.json"):
        check_checkpoint(tmp_path)
    with pytest.raises(FileNotFoundError, match="is a file"):
        check_checkpoint(path / "config.json")
    no_weights = _copy_config(path, tmp_path / "no_weights")
    with pytest.raises(FileNotFoundError, match=f"{no_weights}: no weights"):
        check_checkpoint(no_weights)
    roberta = _copy_config(path, tmp_path / "roberta", model_type="roberta")
    with pytest.raises(ValueError, match="'roberta' checkpoint; raybert runs BERT"):
        check_checkpoint(roberta)
    corrupt = _copy_config(path, tmp_path / "corrupt")
    (corrupt / "model.safetensors").write_bytes(b"not safetensors" * 8)
    with pytest.raises(ValueError, match="model.safetensors: not a readable safetensors file"):
        check_checkpoint(corrupt)


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch PWNED_BY_PICKLE",))


def test_pickle_with_code_is_refused_without_suggesting_weights_only_false(good, tmp_path, monkeypatch):
    path, _ = good
    monkeypatch.chdir(tmp_path)
    evil = _copy_config(path, tmp_path / "evil")
    torch.save({"w": _RunsCode()}, evil / "pytorch_model.bin")
    for fn in (check_checkpoint, load_pretrained):
        with pytest.raises(ValueError) as e:
            fn(evil)
        assert str(evil / "pytorch_model.bin") in str(e.value)
        assert "weights_only=False" not in str(e.value) and "weights_only" not in str(e.value)
    assert not (tmp_path / "PWNED_BY_PICKLE").exists()


def test_plain_tensor_bin_is_accepted(good, tmp_path):
    path, model = good
    plain = _copy_config(path, tmp_path / "plain")
    torch.save(model.state_dict(), plain / "pytorch_model.bin")
    assert check_checkpoint(plain).hidden_size == model.config.hidden_size
