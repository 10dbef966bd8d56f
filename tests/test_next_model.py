"""BLIP3o-NEXT model glue: image vocabulary, condition gathering, connector, embedding init, freezing, presets."""

from __future__ import annotations

import math
import os
from dataclasses import replace

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import torch.nn.functional as F

from blip3o.config.checks import ConfigError
from blip3o.config.model import BackboneConfig
from blip3o.config.next import NextConfig, next_3b, shapes_next
from blip3o.data.tokenizer import load_tokenizer, save_tokenizer, train_bpe_tokenizer
from blip3o.models.next import (
    CONNECTOR_NORM_INIT,
    BLIP3oNext,
    Connector,
    ImageVocab,
    add_image_vocabulary,
    condition_positions,
    gather_condition,
    word_rows,
)
from blip3o.models.unified import positions_from_mask

CORPUS = [
    f"a photo of {n} {c} {s}" for n in ("one", "two", "three") for c in ("red", "blue") for s in ("circle", "star")
]
K = 1024
N = 16  # image tokens per image, as in shapes_next()


def tokenizer():
    return train_bpe_tokenizer(CORPUS, vocab_size=300, min_frequency=1)


@pytest.fixture(scope="module")
def tok_vocab():
    tok = tokenizer()
    return tok, add_image_vocabulary(tok, K, 2)


def _widen(net: BLIP3oNext, seed: int = 0) -> BLIP3oNext:
    """Redraw the backbone's matrices with std 0.2: at the default 0.02 every layer's output is tiny next to
    the residual stream, so padding leaking into attention would move hidden states by only ~1e-6."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.backbone.parameters():
            if p.ndim == 2:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return net


@pytest.fixture(scope="module")
def model(tok_vocab):
    tok, vocab = tok_vocab
    torch.manual_seed(0)
    cfg = replace(shapes_next(), num_scales=2, pool_factors=(1, 2), text_vocab_size=len(tok))
    return _widen(BLIP3oNext.from_config(cfg, vocab)).eval()


# ---------------------------------------------------------------- vocabulary


def test_vocab_ids_are_read_from_the_tokenizer_and_contiguous():
    tok = tokenizer()
    base = len(tok)
    vocab = add_image_vocabulary(tok, K, 3)
    # The ids are what the tokenizer says, and they follow the official layout (tags, scales, codes).
    assert vocab == ImageVocab.appended(base, K, 3)
    assert vocab.im_start == tok.convert_tokens_to_ids("<im_start>")
    assert vocab.im_end == tok.convert_tokens_to_ids("<im_end>")
    assert vocab.scale_ids == tuple(tok.convert_tokens_to_ids([f"<S{i}>" for i in range(3)]))
    code_ids = tok.convert_tokens_to_ids([f"<I{k}>" for k in range(K)])
    assert code_ids == list(range(*vocab.code_range))
    assert vocab.code_range == (base + 5, base + 5 + K)
    assert vocab.vocab_size == len(tok) == base + 2 + 3 + K
    # Written inside text, each image token is one id; the tags are special, codes and scales are not.
    text = "<im_start><S1><I0><I7><I1023><im_end>"
    assert tok.encode(text, add_special_tokens=False) == [
        vocab.im_start,
        vocab.scale_ids[1],
        vocab.first_code_id,
        vocab.first_code_id + 7,
        vocab.first_code_id + K - 1,
        vocab.im_end,
    ]
    assert tok.decode(tok.encode(text, add_special_tokens=False), skip_special_tokens=True) == "<S1><I0><I7><I1023>"
    # Adding again changes nothing.
    assert add_image_vocabulary(tok, K, 3) == vocab
    assert len(tok) == vocab.vocab_size


def test_vocab_survives_tokenizer_save_and_load(tmp_path, tok_vocab):
    tok, vocab = tok_vocab
    loaded = load_tokenizer(save_tokenizer(tok, tmp_path / "tok"))
    assert len(loaded) == len(tok)
    texts = ["<im_start>", "<im_end>", "<S0>", "<S1>"] + [f"<I{k}>" for k in range(K)]
    assert loaded.convert_tokens_to_ids(texts) == tok.convert_tokens_to_ids(texts)
    assert add_image_vocabulary(loaded, K, 2) == vocab
    assert loaded.encode("red <I3><I4>", add_special_tokens=False)[-2:] == [
        vocab.first_code_id + 3,
        vocab.first_code_id + 4,
    ]


def test_vocab_rejects_non_contiguous_code_ids():
    tok = tokenizer()
    tok.add_tokens(["<I5>"])  # already present, so <I5> keeps an id ahead of <I0>
    with pytest.raises(ValueError, match=r"contiguous.*<I5>"):
        add_image_vocabulary(tok, 16, 1)


def test_vocab_code_conversion(tok_vocab):
    _, vocab = tok_vocab
    codes = torch.tensor([[0, 5, K - 1]])
    ids = vocab.codes_to_ids(codes)
    assert ids.tolist() == [[vocab.first_code_id, vocab.first_code_id + 5, vocab.first_code_id + K - 1]]
    assert torch.equal(vocab.ids_to_codes(ids), codes)
    with pytest.raises(ValueError, match="codes must lie"):
        vocab.codes_to_ids(torch.tensor([K]))
    with pytest.raises(ValueError, match="image code id"):
        vocab.ids_to_codes(torch.tensor([vocab.im_end]))


# ---------------------------------------------------------------- condition gathering


def _sequences(vocab: ImageVocab, prompts: list[list[int]], gen: torch.Generator, *, closed: bool) -> list[list[int]]:
    """prompt + <im_start> <S1> N codes (+ <im_end> and a trailing text id when ``closed``)."""
    rows = []
    for p in prompts:
        codes = (torch.randint(0, K, (N,), generator=gen) + vocab.first_code_id).tolist()
        tail = [vocab.im_end, 7] if closed else []
        rows.append([*p, vocab.im_start, vocab.scale_ids[1], *codes, *tail])
    return rows


def _pad(rows: list[list[int]], side: str) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(r) for r in rows)
    ids, mask = [], []
    for r in rows:
        pad = length - len(r)
        ids.append([0] * pad + r if side == "left" else r + [0] * pad)
        mask.append([0] * pad + [1] * len(r) if side == "left" else [1] * len(r) + [0] * pad)
    return torch.tensor(ids), torch.tensor(mask)


def _reference_gather(hidden, ids, mask, vocab, n):
    """Per-row Python: the first real scale token and the n positions after it."""
    out = []
    for b in range(ids.shape[0]):
        row = [t for t in range(ids.shape[1]) if mask[b, t] and int(ids[b, t]) in vocab.scale_ids]
        out.append(hidden[b, row[0] : row[0] + 1 + n])
    return torch.stack(out)


@pytest.mark.parametrize("side", ["left", "right"])
def test_gather_condition_matches_a_per_row_reference(tok_vocab, side):
    _, vocab = tok_vocab
    gen = torch.Generator().manual_seed(1)
    # The second prompt carries an input image (codes without a scale token), which must not be taken.
    ref_image = (torch.arange(5) + vocab.first_code_id + 100).tolist()
    prompts = [[3, 4, 5], [6, vocab.im_start, *ref_image, vocab.im_end, 8, 9, 10, 11], [12]]
    ids, mask = _pad(_sequences(vocab, prompts, gen, closed=side == "right"), side)
    hidden = torch.randn(*ids.shape, 8, generator=gen)
    got = gather_condition(hidden, ids, mask, vocab, N)
    assert got.shape == (3, 1 + N, 8)
    torch.testing.assert_close(got, _reference_gather(hidden, ids, mask, vocab, N), rtol=0, atol=0)
    # The selected ids are the scale token then the row's own codes.
    sel = condition_positions(ids, mask, vocab)
    picked = ids[sel].view(3, 1 + N)
    assert (picked[:, 0] == vocab.scale_ids[1]).all() and vocab.is_code(picked[:, 1:]).all()


def test_gather_condition_errors_on_rows_missing_tokens(tok_vocab):
    _, vocab = tok_vocab
    gen = torch.Generator().manual_seed(2)
    rows = _sequences(vocab, [[3, 4], [5, 6, 7], [8]], gen, closed=True)
    rows[1] = rows[1][:6] + rows[1][7:]  # drop one image token (3 prompt ids, <im_start>, <S1>, codes)
    rows[2] = [t for t in rows[2] if t not in vocab.scale_ids]  # drop the scale token
    ids, mask = _pad(rows, "right")
    hidden = torch.randn(*ids.shape, 8)
    with pytest.raises(ValueError, match=r"rows \[1, 2\] hold \[16, 0\].*exactly 1 \+ num_tokens = 17"):
        gather_condition(hidden, ids, mask, vocab, N)
    # Padding is never counted: a pad id equal to a code id inside the mask's zeros does not extend a row.
    ok_ids, ok_mask = _pad(_sequences(vocab, [[3], [4, 5]], gen, closed=False), "right")
    ok_ids[0, -1] = vocab.first_code_id
    assert gather_condition(torch.randn(*ok_ids.shape, 8), ok_ids, ok_mask, vocab, N).shape == (2, 1 + N, 8)
    with pytest.raises(ValueError, match="exactly 1 \\+ num_tokens = 16"):
        gather_condition(torch.randn(*ok_ids.shape, 8), ok_ids, ok_mask, vocab, N - 1)


# ---------------------------------------------------------------- connector


def test_connector_matches_a_manual_computation():
    torch.manual_seed(3)
    conn = Connector(12, 20)
    assert torch.equal(conn[3].weight, torch.full((20,), CONNECTOR_NORM_INIT))
    assert pytest.approx(2.345207879911715) == CONNECTOR_NORM_INIT
    with torch.no_grad():
        conn[3].weight.uniform_(0.5, 2.0)  # a non-constant gain, so a wrong axis would show
    x = torch.randn(2, 5, 12)
    w1, b1, w2, b2, g = conn[0].weight, conn[0].bias, conn[2].weight, conn[2].bias, conn[3].weight
    a = x @ w1.T + b1
    a = 0.5 * a * (1 + torch.tanh(math.sqrt(2 / math.pi) * (a + 0.044715 * a**3)))
    y = a @ w2.T + b2
    expected = y / torch.sqrt(y.pow(2).mean(-1, keepdim=True) + 1e-5) * g
    torch.testing.assert_close(conn(x), expected, rtol=1e-5, atol=1e-5)
    assert set(conn.state_dict()) == {"0.weight", "0.bias", "2.weight", "2.bias", "3.weight"}


# ---------------------------------------------------------------- model


def test_init_image_embeddings_follows_the_documented_formula(model):
    vocab = model.vocab
    emb = model.backbone.get_input_embeddings().weight
    before = emb.detach().clone()
    codebook = torch.randn(K, 8) * 3 + 1
    model.init_image_embeddings(codebook, generator=torch.Generator().manual_seed(4))

    lo, hi = vocab.code_range
    owned = {vocab.im_start, vocab.im_end, *vocab.scale_ids, *range(lo, hi)}
    text = torch.tensor([i not in owned for i in range(emb.shape[0])])
    p = torch.randn(8, emb.shape[1], generator=torch.Generator().manual_seed(4))
    z = (codebook - codebook.mean(0)) @ p
    expected = before[text].mean(0) + z / z.std() * before[text].std()
    torch.testing.assert_close(emb[lo:hi].detach(), expected, rtol=1e-5, atol=1e-6)
    # Distinct rows (the official init makes them all equal), on the text rows' scale; the rest untouched.
    assert torch.cdist(emb[lo:hi].detach(), emb[lo:hi].detach()).add(torch.eye(K) * 1e9).min() > 1e-3
    assert emb[lo:hi].std().item() == pytest.approx(before[text].std().item(), rel=0.02)
    assert torch.equal(emb.detach()[text], before[text])
    assert torch.equal(emb.detach()[vocab.im_start : lo], before[vocab.im_start : lo])
    # Tied embeddings: the LM head reads the same rows.
    assert model.backbone.get_output_embeddings().weight.data_ptr() == emb.data_ptr()
    with pytest.raises(ValueError, match="codebook_vectors must be"):
        model.init_image_embeddings(torch.randn(K - 1, 8))


def test_word_rows_are_standardised_token_rows_averaged_over_a_word(tok_vocab):
    tok, _ = tok_vocab
    table = torch.randn(len(tok), 12) * 0.02 + 0.5
    words = ["red", "circle", "photo of"]  # the last one spans tokens
    rows = word_rows(tok, table, words)
    for word, row in zip(words, rows, strict=True):
        ids = tok.encode(" " + word, add_special_tokens=False)
        r = table[ids]
        expected = ((r - r.mean(1, keepdim=True)) / r.std(1, keepdim=True)).mean(0)
        torch.testing.assert_close(row, expected)
    assert len(tok.encode(" photo of", add_special_tokens=False)) > 1
    assert not torch.allclose(rows[0], rows[1])


def test_name_init_starts_a_layout_code_from_its_class_and_colour_words():
    """With the word rows as projection, the embedding of the code for "red star" is (up to the shared
    shift and scale) E(red) + E(star) minus the codebook mean, so it sits nearer "red" than any other colour."""
    from blip3o.models.heads import layout_to_ids
    from blip3o.models.image_tokenizer import LayoutTokenizer
    from blip3o.world.spec import COLOR_NAMES, SHAPES

    words = [f"a photo of a {c} {s}" for c in COLOR_NAMES for s in SHAPES] + ["on a background"]
    tok = train_bpe_tokenizer(words, vocab_size=300, min_frequency=1)
    layout = LayoutTokenizer(4)
    codebook = layout.codebook_vectors()
    vocab = add_image_vocabulary(tok, codebook.shape[0], 1)
    cfg = replace(shapes_next(), image_codes="layout", name_init=True, text_vocab_size=len(tok))
    cfg = replace(cfg, codebook_size=codebook.shape[0], image_tokens=16)
    net = BLIP3oNext.from_config(cfg, vocab)
    emb = net.backbone.get_input_embeddings().weight
    projection = word_rows(tok, emb, layout.vector_names())
    net.init_image_embeddings(codebook, projection=projection)
    lo, _ = vocab.code_range
    one_hot = torch.zeros(1, codebook.shape[1], 1, 1) - 1
    one_hot[0, 1 + SHAPES.index("star")] = one_hot[0, 1 + len(SHAPES) + 1 + COLOR_NAMES.index("red")] = 1
    red_star = emb[lo + int(layout_to_ids(one_hot))].detach()
    colours = word_rows(tok, emb, list(COLOR_NAMES))
    z = (codebook - codebook.mean(0)) @ projection
    text = torch.ones(emb.shape[0], dtype=torch.bool)
    text[vocab.added_ids] = False
    centred = (red_star - emb.detach()[text].mean(0)) / emb.detach()[text].std() * z.std()
    torch.testing.assert_close(centred, z[int(layout_to_ids(one_hot))], rtol=1e-4, atol=1e-4)
    assert F.cosine_similarity(centred[None], colours).argmax().item() == COLOR_NAMES.index("red")
    with pytest.raises(ValueError, match="projection must be"):
        net.init_image_embeddings(codebook, projection=projection[:, :-1])
    with pytest.raises(ConfigError, match="name_init"):
        NextConfig(name_init=True)  # SimVQ codes have no names


def test_init_image_embeddings_untied_head_uses_its_own_statistics(tok_vocab):
    _, vocab = tok_vocab
    cfg = replace(shapes_next(), num_scales=2, pool_factors=(1, 2), backbone=BackboneConfig(tie_embeddings=False))
    net = BLIP3oNext.from_config(cfg, vocab)
    head = net.backbone.get_output_embeddings().weight
    with torch.no_grad():
        head.mul_(5).add_(1)  # different statistics from the input table
    before = head.detach().clone()
    codebook = torch.randn(K, 8)
    net.init_image_embeddings(codebook, generator=torch.Generator().manual_seed(5))
    lo, hi = vocab.code_range
    text = torch.ones(head.shape[0], dtype=torch.bool)
    text[vocab.added_ids] = False
    p = torch.randn(8, head.shape[1], generator=torch.Generator().manual_seed(5))
    z = (codebook - codebook.mean(0)) @ p
    torch.testing.assert_close(
        head[lo:hi].detach(), before[text].mean(0) + z / z.std() * before[text].std(), rtol=1e-5, atol=1e-5
    )
    assert not torch.allclose(head[lo:hi], net.backbone.get_input_embeddings().weight[lo:hi])


def test_condition_does_not_depend_on_padding(model):
    vocab = model.vocab
    gen = torch.Generator().manual_seed(6)
    prompts = [[3, 4, 5, 6, 7, 8, 9], [10, 11], [12, 13, 14, 15]]
    for side, closed in (("left", False), ("right", True)):
        rows = _sequences(vocab, prompts, gen, closed=closed)
        ids, mask = _pad(rows, side)
        with torch.no_grad():
            batch = model.condition(ids, mask, N)
            alone = [model.condition(torch.tensor([r]), torch.ones(1, len(r), dtype=torch.long), N) for r in rows]
        assert batch.shape == (3, 1 + N, 96)
        torch.testing.assert_close(batch, torch.cat(alone), rtol=0, atol=1e-5)


def test_forward_velocity_and_null_condition_match_their_parts(model):
    vocab = model.vocab
    gen = torch.Generator().manual_seed(7)
    ids, mask = _pad(_sequences(vocab, [[3, 4, 5], [6]], gen, closed=False), "left")
    with torch.no_grad():
        out = model(ids, mask)
        ref = model.backbone(input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask))
        torch.testing.assert_close(out.logits, ref.logits)
        assert out.logits.shape == (*ids.shape, vocab.vocab_size)
        cond = model.connect(out.hidden, ids, mask, N)
        torch.testing.assert_close(cond, model.condition(ids, mask, N))
        # Dropping a row's condition before the connector gives the null condition.
        dropped = model.condition(ids, mask, N, keep=torch.tensor([0.0, 1.0]))
        torch.testing.assert_close(dropped[0], model.null_condition(1, N)[0])
        torch.testing.assert_close(dropped[1], cond[1])

        x = torch.randn(2, 4, 16, 16, generator=gen)
        sigma = torch.tensor([0.3, 0.9])
        v = model.velocity(x, sigma, cond)
        t = torch.tensor([300.0, 900.0])
        # Reference-latent channels follow the latents: zeros without a reference.
        torch.testing.assert_close(v, model.dit(torch.cat([x, torch.zeros_like(x)], 1), cond, t).sample)
        r = torch.randn(x.shape, generator=gen)
        torch.testing.assert_close(
            model.velocity(x, sigma, cond, reference=r), model.dit(torch.cat([x, r], 1), cond, t).sample
        )
        assert v.shape == x.shape
        torch.testing.assert_close(
            model.velocity(x, torch.tensor(0.3), cond), model.velocity(x, sigma[:1].expand(2), cond)
        )
        # A masked condition token changes nothing when its values change.
        cmask = torch.ones(2, 1 + N, dtype=torch.long)
        cmask[:, -1] = 0
        other = cond.clone()
        other[:, -1] += 10
        torch.testing.assert_close(model.velocity(x, sigma, cond, cmask), model.velocity(x, sigma, other, cmask))


def test_freezing_keeps_only_the_listed_sana_modules(tok_vocab):
    _, vocab = tok_vocab
    cfg = replace(shapes_next(), num_scales=2, pool_factors=(1, 2))
    net = _widen(BLIP3oNext.from_config(cfg, vocab))
    net.freeze_sana_except(cfg.train_sana)
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    names = [n for n, _ in net.named_parameters()]
    expected = {
        n for n in names if n.startswith(("backbone.", "connector.", "dit.caption_projection.", "dit.caption_norm."))
    }
    assert trainable == expected
    assert any(n.startswith("dit.transformer_blocks.") for n in names) and "dit.caption_norm.weight" in trainable

    # The flow loss reaches the backbone through the connector (not detached) and nothing frozen gets a grad.
    gen = torch.Generator().manual_seed(8)
    ids, mask = _pad(_sequences(vocab, [[3, 4], [5]], gen, closed=True), "right")
    cond = net.condition(ids, mask, N)
    v = net.velocity(torch.randn(2, 4, 16, 16, generator=gen), torch.tensor([0.5, 0.5]), cond)
    v.square().mean().backward()
    for n, p in net.named_parameters():
        if not p.requires_grad:
            assert p.grad is None, n
    assert net.connector[0].weight.grad.abs().sum() > 0
    assert net.backbone.model.layers[0].mlp.up_proj.weight.grad.abs().sum() > 0

    with pytest.raises(ValueError, match="not a module or parameter path inside the DiT"):
        net.freeze_sana_except(["caption_proj"])


# ---------------------------------------------------------------- config and full size


def test_next_3b_builds_on_meta_with_the_official_shapes(capsys):
    cfg = next_3b()
    assert (cfg.vocab_size, cfg.condition_tokens, cfg.latent_shape) == (217210, 730, (32, 32, 32))
    with torch.device("meta"):
        net = BLIP3oNext.from_config(cfg)
    bb = net.backbone.config
    assert (bb.hidden_size, bb.num_hidden_layers, bb.num_attention_heads, bb.num_key_value_heads) == (2048, 28, 16, 8)
    assert (bb.head_dim, bb.intermediate_size, bb.tie_word_embeddings) == (128, 6144, True)
    rows = net.backbone.get_input_embeddings().weight.shape[0]
    assert rows >= 151669 + 65536 + 3 + 2 and rows == net.vocab.vocab_size == 217210
    assert net.vocab.code_range == (151674, 217210) and net.vocab.scale_ids == (151671, 151672, 151673)
    dit = net.dit.config
    assert (dit.num_layers, dit.num_attention_heads * dit.attention_head_dim) == (20, 2240)
    assert (dit.caption_channels, dit.in_channels, dit.out_channels, dit.sample_size) == (2304, 32, 32, 32)
    assert len(net.dit.transformer_blocks) == 20
    assert net.dit.caption_projection.linear_1.in_features == 2304
    assert (net.connector[0].in_features, net.connector[2].out_features, net.connector[3].weight.shape) == (
        2048,
        2304,
        (2304,),
    )

    def count(m: torch.nn.Module) -> int:
        return sum(p.numel() for p in m.parameters())

    n_bb, n_conn, n_dit = count(net.backbone), count(net.connector), count(net.dit)
    assert n_bb == pytest.approx(1.85e9, rel=0.05)  # Qwen3-1.7B layers + a 217,210-row tied embedding
    assert n_dit == pytest.approx(1.6e9, rel=0.1)  # SANA 1.6B
    assert n_conn == 2048 * 2304 + 2304 + 2304 * 2304 + 2304 + 2304
    with capsys.disabled():
        print(
            f"\nnext-3b: backbone {n_bb / 1e9:.3f}B, connector {n_conn / 1e6:.2f}M, SANA {n_dit / 1e9:.3f}B, "
            f"total {(n_bb + n_conn + n_dit) / 1e9:.3f}B"
        )


def test_shapes_next_is_tiny_and_consistent():
    cfg = shapes_next()
    assert (cfg.backbone.hidden_size, cfg.backbone.num_layers, cfg.sana.hidden_size, cfg.sana.num_layers) == (
        64,
        2,
        64,
        2,
    )
    assert (cfg.latent_shape, cfg.codebook_size, cfg.image_tokens, cfg.condition_tokens) == ((4, 16, 16), 1024, 16, 17)
    assert cfg.train_sana == ["caption_projection", "caption_norm"] and cfg.train_prompt_text is False
    assert next_3b().train_prompt_text is True


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("codebook_size", 1, r"next\.codebook_size: must be an int >= 2, got 1"),
        ("num_scales", 0, r"next\.num_scales: must be an int >= 1, got 0"),
        ("image_tokens", 2.5, r"next\.image_tokens: must be an int >= 1"),
        ("connector_dim", 0, r"next\.connector_dim"),
        ("latent_side", 0, r"next\.latent_side"),
        ("cond_dropout", 1.5, r"next\.cond_dropout: must be a float in \[0, 1\]"),
        ("ce_weight", -1.0, r"next\.ce_weight"),
        ("train_prompt_text", 1, r"next\.train_prompt_text: must be a bool"),
        ("train_sana", "caption_norm", r"next\.train_sana: must be a list"),
        ("train_sana", ["caption_proj"], r"next\.train_sana: every path must start with one of"),
        ("train_sana", ["caption_norm", "caption_norm"], r"next\.train_sana: paths must be distinct"),
        ("sana", None, r"next\.sana: must be a DiTConfig"),
    ],
)
def test_config_validation_names_the_field(field, value, message):
    with pytest.raises(ConfigError, match=message):
        NextConfig(**{field: value})
    with pytest.raises(ConfigError, match="cannot both be 0"):
        NextConfig(ce_weight=0.0, flow_weight=0)


def test_from_config_rejects_a_mismatched_vocabulary(tok_vocab):
    _, vocab = tok_vocab
    with pytest.raises(ValueError, match="1024 codes and 2 scales"):
        BLIP3oNext.from_config(shapes_next(), vocab)  # shapes_next has one scale


def test_condition_positions_dtype_is_bool(tok_vocab):
    _, vocab = tok_vocab
    ids, mask = _pad(_sequences(vocab, [[3]], torch.Generator().manual_seed(9), closed=True), "right")
    sel = condition_positions(ids, mask, vocab)
    assert sel.dtype == torch.bool and int(sel.sum()) == 1 + N and sel.shape == ids.shape
