"""The attacked embedding is the one the model really uses, on every common architecture.

With ``embedding=None`` the callback must perturb the weight returned by
``get_input_embeddings()``, through every ``nn.Embedding`` module that shares it (T5
never calls the module it returns: its encoder and decoder call their own
``embed_tokens``, which share its weight). A spy hook registered after the callback's own
hooks sees, in each adversarial forward, that exactly this Parameter (weight target) or
this module's output (output target) moved by ``epsilon``, and nothing else did.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
import transformers as hf
from torch import Tensor, nn

from lightning_adv import FGM
from tests.helpers import PAD, VOCAB, Classifier, loader, make_batches, tiny_bert, trainer

EPSILON = 0.05
HIDDEN = 16


# -- tiny models ---------------------------------------------------------------------------


def _common() -> dict[str, Any]:
    return dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=1,
                num_attention_heads=2, intermediate_size=2 * HIDDEN,
                max_position_embeddings=40, pad_token_id=PAD, num_labels=3)


def _gpt2_config(**kwargs: Any) -> hf.GPT2Config:
    return hf.GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=1, n_head=2, n_positions=32,
                         bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1, **kwargs)


BUILDERS: dict[str, Callable[[], nn.Module]] = {
    "bert": lambda: hf.BertForSequenceClassification(hf.BertConfig(**_common())),
    "roberta": lambda: hf.RobertaForSequenceClassification(hf.RobertaConfig(**_common())),
    "deberta-v2": lambda: hf.DebertaV2ForSequenceClassification(
        hf.DebertaV2Config(**_common())
    ),
    "electra": lambda: hf.ElectraForSequenceClassification(
        hf.ElectraConfig(embedding_size=HIDDEN, **_common())
    ),
    "distilbert": lambda: hf.DistilBertForSequenceClassification(hf.DistilBertConfig(
        vocab_size=VOCAB, dim=HIDDEN, n_layers=1, n_heads=2, hidden_dim=2 * HIDDEN,
        max_position_embeddings=32, pad_token_id=PAD, num_labels=3,
    )),
    "xlnet": lambda: hf.XLNetForSequenceClassification(hf.XLNetConfig(
        vocab_size=VOCAB, d_model=HIDDEN, n_layer=1, n_head=2, d_inner=2 * HIDDEN,
        pad_token_id=PAD, num_labels=3,
    )),
    "gpt2-cls": lambda: hf.GPT2ForSequenceClassification(
        _gpt2_config(pad_token_id=PAD, num_labels=3)
    ),
    "gpt2-lm": lambda: hf.GPT2LMHeadModel(_gpt2_config(tie_word_embeddings=True)),
    "t5": lambda: hf.T5ForConditionalGeneration(hf.T5Config(
        vocab_size=VOCAB, d_model=HIDDEN, d_kv=8, d_ff=2 * HIDDEN, num_layers=1,
        num_decoder_layers=1, num_heads=2, pad_token_id=PAD, decoder_start_token_id=PAD,
        eos_token_id=VOCAB - 1,
    )),
}

# XLNet transposes `input_ids` to (tokens, batch) before its embedding lookup.
BATCH_DIM = {"xlnet": 1}


def build(arch: str) -> nn.Module:
    torch.manual_seed(0)
    return BUILDERS[arch]().to(torch.float64)


def batch_for(arch: str) -> dict[str, Tensor]:
    batch = make_batches(1, seed=3)[0]
    ids, mask = batch["input_ids"], batch["attention_mask"].bool()
    if arch == "gpt2-lm":
        batch["labels"] = ids.masked_fill(~mask, -100)
    elif arch == "t5":
        # Encoder ids in 1..24, target ids in 25..49: each half of the table has rows only
        # one of the two `embed_tokens` calls touches.
        batch["input_ids"] = torch.where(mask, (ids - 1) % 24 + 1, PAD)
        generator = torch.Generator().manual_seed(4)
        batch["labels"] = torch.randint(25, VOCAB, (ids.shape[0], 5), generator=generator)
    return batch


# -- the spy -------------------------------------------------------------------------------


@dataclass
class Call:
    name: str
    adversarial: bool
    ids: Tensor
    output: Tensor
    weight: Tensor
    moved: list[nn.Parameter]  # parameters differing from their value at batch start


class Spy(pl.Callback):
    """Records every call of the modules holding ``weight`` and what each call saw.

    Put it before the adversarial callback: its ``on_after_backward`` then marks the
    passes that follow as adversarial. Its hooks are added at ``on_train_start``, after
    the callback's own, so they see the outputs the callback returns.
    """

    def __init__(self, weight: nn.Parameter) -> None:
        self.weight = weight
        self.calls: list[Call] = []
        self.restored: list[bool] = []
        self.names: dict[nn.Module, str] = {}
        self._adversarial = False
        self._start: list[tuple[nn.Parameter, Tensor]] = []
        self._weight_start: Tensor | None = None
        self._ptr = weight.data_ptr()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for name, module in pl_module.named_modules():
            if isinstance(module, nn.Embedding) and module.weight is self.weight:
                self.names[module] = name
                module.register_forward_hook(self._hook)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                             batch: Any, batch_idx: int) -> None:
        self._adversarial = False
        self._start = [(p, p.detach().clone()) for p in pl_module.parameters()]
        self._weight_start = self.weight.detach().clone()

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._adversarial = True

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: Any) -> None:
        assert self._weight_start is not None
        self.restored.append(
            torch.equal(self.weight, self._weight_start) and self.weight.data_ptr() == self._ptr
        )

    def _hook(self, module: nn.Module, args: tuple[Any, ...], output: Tensor) -> None:
        moved = [p for p, value in self._start if not torch.equal(p, value)]
        self.calls.append(Call(self.names[module], self._adversarial, args[0].clone(),
                               output.detach().clone(), module.weight.detach().clone(), moved))

    def split(self) -> tuple[list[Call], list[Call]]:
        clean = [c for c in self.calls if not c.adversarial]
        adversarial = [c for c in self.calls if c.adversarial]
        return clean, adversarial


def fit(module: pl.LightningModule, batch: dict[str, Tensor], weight: nn.Parameter,
        **fgm_kwargs: Any) -> Spy:
    spy = Spy(weight)
    callback = FGM(epsilon=EPSILON, **fgm_kwargs)
    trainer([spy, callback], max_steps=1).fit(module, loader([batch]))
    assert callback.attacked_steps == 1
    return spy


def per_example_norms(clean: list[Call], adversarial: list[Call], batch_dim: int) -> Tensor:
    pieces = [
        (adv.output - ref.output).movedim(batch_dim, 0).flatten(1)
        for ref, adv in zip(clean, adversarial, strict=True)
    ]
    return torch.linalg.vector_norm(torch.cat(pieces, dim=1), dim=1)


# -- get_input_embeddings() on every architecture --------------------------------------------


@pytest.mark.parametrize("target", ["weight", "output"])
@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_input_embeddings_weight_is_attacked(arch, target):
    model = build(arch)
    weight = model.get_input_embeddings().weight
    start = weight.detach().clone()
    spy = fit(Classifier(model), batch_for(arch), weight, target=target)

    clean, adversarial = spy.split()
    assert clean, f"{arch}: no module holding the input-embedding weight was called"
    assert [c.name for c in adversarial] == [c.name for c in clean]
    assert all(c.moved == [] and torch.equal(c.weight, start) for c in clean)

    if target == "weight":
        touched = torch.cat([c.ids.flatten() for c in clean]).unique()
        untouched = torch.ones(VOCAB, dtype=torch.bool)
        untouched[touched] = False
        for call in adversarial:
            assert len(call.moved) == 1 and call.moved[0] is weight, arch
            delta = call.weight - start
            assert torch.equal(delta[untouched], torch.zeros_like(delta[untouched])), arch
            assert torch.linalg.vector_norm(delta).item() == pytest.approx(EPSILON, rel=1e-9)
            expected = F.embedding(call.ids, call.weight)
            assert torch.equal(call.output, expected), arch
    else:
        assert all(c.moved == [] for c in adversarial), arch
        for ref, adv in zip(clean, adversarial, strict=True):
            assert not torch.equal(ref.output, adv.output), f"{arch}: {ref.name} not perturbed"
        norms = per_example_norms(clean, adversarial, BATCH_DIM.get(arch, 0))
        torch.testing.assert_close(norms, torch.full_like(norms, EPSILON), rtol=1e-9, atol=0)

    assert spy.restored == [True]
    assert torch.equal(weight, start)


def test_t5_encoder_and_decoder_calls_are_both_attacked():
    model = build("t5")
    shared = model.get_input_embeddings()
    holders = [
        m for m in model.modules() if isinstance(m, nn.Embedding) and m.weight is shared.weight
    ]
    # transformers 5: `shared` is never called; encoder and decoder call their own module.
    assert {id(m) for m in holders} == {
        id(shared), id(model.encoder.embed_tokens), id(model.decoder.embed_tokens)
    }
    assert model.encoder.embed_tokens is not shared

    batch = batch_for("t5")
    start = shared.weight.detach().clone()
    spy = fit(Classifier(model), batch, shared.weight, target="weight")
    clean, adversarial = spy.split()
    assert [c.name for c in clean] == ["model.encoder.embed_tokens", "model.decoder.embed_tokens"]
    changed = (adversarial[0].weight != start).any(dim=1)
    assert changed[1:25].any(), "no row only the encoder reads was perturbed"
    assert changed[25:].any(), "no row only the decoder reads was perturbed"

    model = build("t5")
    spy = fit(Classifier(model), batch, model.shared.weight, target="output")
    clean, adversarial = spy.split()
    for ref, adv in zip(clean, adversarial, strict=True):
        assert not torch.equal(ref.output, adv.output), f"{ref.name} output not perturbed"


# -- modules sharing the weight, and an embedding the loss never calls ------------------------


class _Toy(nn.Module):
    """Mean of token embeddings into a linear head; reads through ``reader``."""

    def __init__(self, share: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.table = nn.Embedding(VOCAB, HIDDEN, padding_idx=PAD)
        self.reader = nn.Embedding(VOCAB, HIDDEN, padding_idx=PAD)
        if share:
            self.reader.weight = self.table.weight
        self.head = nn.Linear(HIDDEN, 3)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.table

    def forward(self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor) -> Any:
        hidden = self.reader(input_ids) * attention_mask.unsqueeze(-1)
        logits = self.head(hidden.sum(1) / attention_mask.sum(1, keepdim=True))
        return SimpleNamespace(loss=F.cross_entropy(logits, labels), logits=logits)


@pytest.mark.parametrize("target", ["weight", "output"])
def test_module_sharing_the_weight_is_part_of_the_embedding(target):
    model = _Toy(share=True)
    spy = fit(Classifier(model), make_batches(1)[0], model.table.weight, target=target)
    clean, adversarial = spy.split()
    assert [c.name for c in adversarial] == ["model.reader"]
    if target == "weight":
        assert not torch.equal(adversarial[0].weight, clean[0].weight)
    else:
        assert not torch.equal(adversarial[0].output, clean[0].output)
    assert spy.restored == [True]


def test_embedding_never_called_is_an_error_naming_it():
    model = _Toy(share=False)
    start = model.table.weight.detach().clone()
    with pytest.raises(RuntimeError, match=r"'model\.table' was not called") as info:
        fit(Classifier(model), make_batches(1)[0], model.table.weight)
    assert "embedding=" in str(info.value)
    assert torch.equal(model.table.weight, start)

    # What the message asks for works.
    spy = fit(Classifier(model), make_batches(1)[0], model.reader.weight, embedding="reader")
    clean, adversarial = spy.split()
    assert adversarial and not torch.equal(adversarial[0].weight, clean[0].weight)


class _Detached(_Toy):
    def forward(self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor) -> Any:
        hidden = self.table(input_ids).detach() * attention_mask.unsqueeze(-1)
        logits = self.head(hidden.sum(1) / attention_mask.sum(1, keepdim=True))
        return SimpleNamespace(loss=F.cross_entropy(logits, labels), logits=logits)


@pytest.mark.parametrize("target", ["weight", "output"])
def test_embedding_cut_from_the_loss_is_an_error(target):
    model = _Detached(share=False)
    start = model.table.weight.detach().clone()
    with pytest.raises(RuntimeError, match=r"did not reach the output of the embedding "
                                           r"'model\.table' through autograd"):
        fit(Classifier(model), make_batches(1)[0], model.table.weight, target=target)
    assert torch.equal(model.table.weight, start)


# -- embedding= as a suffix or a dotted path ---------------------------------------------------


@pytest.mark.parametrize("spec", [
    "word_embeddings", "embeddings.word_embeddings", "model.bert.embeddings.word_embeddings",
])
def test_embedding_by_suffix_or_path(spec):
    model = tiny_bert()
    weight = model.bert.embeddings.word_embeddings.weight
    spy = fit(Classifier(model), make_batches(1)[0], weight, embedding=spec)
    _, adversarial = spy.split()
    assert len(adversarial) == 1
    assert len(adversarial[0].moved) == 1 and adversarial[0].moved[0] is weight


def test_shared_table_by_name_includes_its_callers():
    model = build("t5")
    spy = fit(Classifier(model), batch_for("t5"), model.shared.weight, embedding="shared",
              target="output")
    clean, adversarial = spy.split()
    assert [c.name for c in adversarial] == ["model.encoder.embed_tokens",
                                             "model.decoder.embed_tokens"]
    assert all(not torch.equal(r.output, a.output) for r, a in zip(clean, adversarial, strict=True))


class _Pair(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first = tiny_bert(seed=0)
        self.second = tiny_bert(seed=1)

    def forward(self, **batch: Tensor) -> Any:
        return self.first(**batch)


BERT_EMBEDDINGS = ["word_embeddings", "position_embeddings", "token_type_embeddings"]


@pytest.mark.parametrize(("spec", "wording"), [
    ("word_embeddings", "matches 2"),
    ("embeddings", "matches no"),
    ("wte", "matches no"),
    (None, "several word embeddings"),
])
def test_unresolvable_embedding_fails_at_setup_listing_embeddings(spec, wording):
    module = Classifier(_Pair())
    with pytest.raises(RuntimeError, match=wording) as info:
        trainer([FGM(embedding=spec)], max_steps=1).fit(module, loader(make_batches(1)))
    assert module.training_step_calls == 0
    listed = [f"'model.{bert}.bert.embeddings.{name}'"
              for bert in ("first", "second") for name in BERT_EMBEDDINGS]
    if spec is None:
        listed = listed[::3]  # only the two word embeddings are candidates
    for name in listed:
        assert name in str(info.value)


@pytest.mark.parametrize("arch", ["gpt2-cls", "xlnet", "t5"])
def test_padding_without_padding_idx_is_masked_by_the_attention_mask(arch):
    # These embeddings have no padding row; the batch's attention mask marks the padding
    # positions, which a random start (FreeLB) must leave at zero. T5's decoder ids do
    # not match the mask: all of their positions count.
    from lightning_adv import FreeLB

    starts: list[Tensor] = []

    class Recording(FreeLB):
        def _random_start(self, step: Any) -> Any:
            start = super()._random_start(step)
            starts.append(start.detach().clone())
            return start

    model, batch = build(arch), batch_for(arch)
    attack = Recording(steps=1, init_magnitude=1.0, loss_fn="compute_loss")
    trainer([attack], max_steps=1).fit(Classifier(model), loader([batch]))
    [start] = starts
    mask = batch["attention_mask"].bool()
    tokens = mask.shape[1]
    encoder = start[:, :tokens * HIDDEN].reshape(mask.shape[0], tokens, HIDDEN)
    assert torch.all(encoder[~mask] == 0) and torch.all(encoder[mask] != 0)
    if arch == "t5":
        assert torch.all(start[:, tokens * HIDDEN:] != 0)


def test_xlnet_with_as_many_tokens_as_examples_is_read_batch_second():
    # XLNet looks up its ids transposed. With 7 examples of 7 tokens the output's shape
    # cannot tell the layouts apart; the ids, the batch's input_ids transposed, can.
    spaces: list[Any] = []

    class Recording(FGM):
        def attack(self, step: Any) -> None:
            spaces.append(step.space)
            super().attack(step)

    batch = make_batches(1, batch_size=7, seq_len=7, seed=5)[0]
    attack = Recording(epsilon=EPSILON, target="output")
    trainer([attack], max_steps=1).fit(Classifier(build("xlnet")), loader([batch]))
    [space] = spaces
    assert space.dims == [1]
    # Padding is masked per example: example i's row is zero where its mask is 0.
    keep = space.keep.reshape(7, 7, HIDDEN)[:, :, 0]
    assert torch.equal(keep, batch["attention_mask"].bool())
