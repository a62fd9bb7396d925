"""hf_ptq hub datasets: offline errors, and the sampling rules against a fake ``datasets`` module."""

import importlib.machinery
import sys
import types

import pytest

from jaxquant.data import hub, load_texts
from jaxquant.errors import DataError


@pytest.fixture
def online(monkeypatch):
    """Pretend the hub is reachable (no network is used: datasets is faked)."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(hub, "hub_unreachable_reason", lambda: None)


@pytest.fixture
def fake_datasets(monkeypatch):
    """A ``datasets`` stand-in whose load_dataset records its calls and streams numbered samples."""
    calls = []

    def load_dataset(path=None, name=None, split=None, streaming=False, data_files=None):
        calls.append(dict(path=path, name=name, split=split, streaming=streaming, data_files=data_files))
        if path == "boom":
            raise ConnectionError("simulated network failure")

        def stream():
            for i in range(10_000):
                if path == "abisee/cnn_dailymail":
                    yield {"article": "" if i == 1 else f"{split} article {i}", "highlights": "h", "id": str(i)}
                elif path.startswith("nvidia/"):
                    yield {"messages": [{"role": "user", "content": f"{split} q{i}"},
                                        {"role": "assistant", "content": f"a{i}"}]}
                else:
                    yield {"text": f"{path}:{split}:{i}", "other": f"o{i}"}

        return stream()

    mod = types.ModuleType("datasets")
    mod.__spec__ = importlib.machinery.ModuleSpec("datasets", None)
    mod.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", mod)
    return calls


def test_offline_env_var_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError) as e:
        load_texts("cnn_dailymail", 8)
    msg = str(e.value)
    assert "dataset 'cnn_dailymail' needs the Hugging Face hub, which is not reachable (offline" in msg
    assert "HF_HUB_OFFLINE=1" in msg and "--dataset path.jsonl" in msg and "built-in" in msg


def test_unreachable_host_fails_fast(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.delenv("HTTPS_PROXY", raising=False)
    monkeypatch.delenv("https_proxy", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.invalid")
    hub._probe.cache_clear()
    with pytest.raises(DataError, match=r"'wikitext' needs the Hugging Face hub, which is not reachable \(offline: "
                                        r"cannot connect to hub\.invalid:443"):
        load_texts("wikitext", 4)
    hub._probe.cache_clear()


def test_missing_datasets_package(online, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes find_spec raise / import fail
    real = hub.importlib.util.find_spec
    monkeypatch.setattr(hub.importlib.util, "find_spec", lambda n, *a: None if n == "datasets" else real(n, *a))
    with pytest.raises(DataError, match=r"`datasets` package.*pip install datasets.*--dataset lee_news"):
        load_texts("c4", 4)


def test_cnn_dailymail_first_n_streamed(online, fake_datasets):
    texts = load_texts("cnn_dailymail", 5)
    assert fake_datasets == [dict(path="abisee/cnn_dailymail", name="3.0.0", split="train", streaming=True,
                                  data_files=None)]
    # hf_ptq counts the empty sample 1 towards N and drops it
    assert texts == ["train article 0", "train article 2", "train article 3", "train article 4"]


def test_splits_share_n_like_hf_ptq(online, fake_datasets):
    texts = load_texts("nemotron-post-training-dataset-v2", 10)
    assert [c["split"] for c in fake_datasets] == ["stem", "chat", "math", "code"]
    per_split = {s: sum(t.startswith(s + " ") for t in texts) for s in ("stem", "chat", "math", "code")}
    assert per_split == {"stem": 2, "chat": 2, "math": 2, "code": 4}  # remainder to the last split
    assert texts[0] == "stem q0\na0"  # messages[*].content joined with "\n"
    fake_datasets.clear()
    load_texts("nemotron-post-training-dataset-v2", 8, split="chat")
    assert [c["split"] for c in fake_datasets] == ["chat"]


def test_combo_and_lists(online, fake_datasets):
    texts = load_texts("cnn_nemotron_v2_mix", 5)
    # 5 -> 3 cnn + 2 nemotron; 2 over 4 splits is [0, 0, 0, 2] and zero-quota splits are not opened
    assert [(c["path"], c["split"]) for c in fake_datasets] == [
        ("abisee/cnn_dailymail", "train"), ("nvidia/Nemotron-Post-Training-Dataset-v2", "code")]
    assert sum(t.startswith("train article") for t in texts) == 2  # 3 sampled, one empty
    fake_datasets.clear()
    texts = load_texts("wikitext,hf:org/custom", "3,2")
    assert texts == [
        "Salesforce/wikitext:train:0", "Salesforce/wikitext:train:1", "Salesforce/wikitext:train:2",
        "org/custom:train:0", "org/custom:train:1",
    ]
    assert fake_datasets[0]["name"] == "wikitext-103-v1" and fake_datasets[1]["name"] is None
    fake_datasets.clear()
    assert load_texts("org/custom", 1, field="other") == ["o0"]  # bare repo ids go to the hub too


def test_agentic_reads_raw_files(online, fake_datasets):
    load_texts("nemotron-sft-agentic-v2", 1)
    assert fake_datasets == [dict(path="nvidia/Nemotron-SFT-Agentic-v2", name=None, split="train", streaming=True,
                                  data_files="data/search*.jsonl")]


def test_bare_wikipedia_is_builtin_and_hf_prefix_is_hub(online, fake_datasets):
    if hub.importlib.util.find_spec("gensim") is not None:
        assert load_texts("wikipedia", 1)[0].startswith("Anarchism")
    assert fake_datasets == []
    assert load_texts("hf:wikipedia", 2) == ["wikipedia:train:0", "wikipedia:train:1"]
    assert fake_datasets[0]["name"] == "20220301.en"


def test_hub_errors_become_data_errors(online, fake_datasets):
    with pytest.raises(DataError, match=r"could not read dataset 'boom'.*ConnectionError: simulated"):
        load_texts("hf:boom", 2)
