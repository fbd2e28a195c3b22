"""Attention analysis (paper §4.4, Fig. 4, Fig. 7): the single-row attention equals the row of the
eager backend's full probabilities (every layer and head, text and vision queries, padding), the
answer attention picks each prompt's patches, the difference metrics equal the paper's formulas
written out, and `libra-lm attention` writes its report, offline."""

import json

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import libra_lm.attention as attention_module
from builders import TINY, cli_error, mixed_batch, randomize_
from libra_cli.lm import main
from libra_lm import LibraForCausalLM
from libra_lm.generate import build_prompt, collate_prompts, generate
from libra_lm.segments import image_segment
from libra_lm.visual import (
    DifferenceAccumulator,
    answer_attention,
    attention_differences,
    last_token_attention,
)
from libra_lm.visual.attention_maps import default_heatmap_layers, read_questions

pytestmark = pytest.mark.usefixtures("one_thread")

P, V_T = TINY.num_image_tokens, TINY.text_vocab_size


def random_model(seed=0, backend="sdpa", config=TINY, scale=0.3):
    torch.manual_seed(seed)
    return randomize_(LibraForCausalLM(config, attn_backend=backend), seed=seed, scale=scale).eval()


def eager_probabilities(model, ids, feats, mask):
    """(L, B, H, N, N): the probabilities the eager backend computes in a full forward."""
    captured = []
    original = attention_module.eager_bridged_probs

    def record(*args, **kwargs):
        probs = original(*args, **kwargs)
        captured.append(probs)
        return probs

    backend, model.attn_backend = model.attn_backend, "eager"
    attention_module.eager_bridged_probs = record
    try:
        with torch.no_grad():
            model(ids, feats, mask)
    finally:
        attention_module.eager_bridged_probs = original
        model.attn_backend = backend
    return torch.stack(captured)


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_single_row_attention_equals_the_eager_full_probabilities(backend):
    model = random_model(seed=1, backend=backend)
    # Row 0 ends with text, row 1 inside its image (a patch): both modalities of query.
    ids, feats = mixed_batch(TINY, [[("t", 3), ("i", 5), ("t", 4)], [("t", 5), ("i", 6), ("t", 1)]], seed=2)
    ids, feats = ids[:, :-2], feats[:, :-2]
    assert ids[0, -1, 0] < V_T and V_T <= ids[1, -1, 0] < TINY.boi_token_id
    mask = torch.ones(ids.shape[:2], dtype=torch.long)
    mask[0, :2] = 0  # left padding
    rows = last_token_attention(model, ids, feats, mask)
    full = eager_probabilities(model, ids, feats, mask)
    assert rows.shape == (TINY.num_hidden_layers, 2, TINY.num_attention_heads, ids.shape[1])
    torch.testing.assert_close(rows, full[:, :, :, -1], rtol=1e-4, atol=1e-5)  # fp32 noise of other backends
    assert not rows[:, 0, :, :2].any() and torch.allclose(rows.sum(-1), torch.ones(()))
    assert model.attention_probe is None  # the probe is removed again


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["flex", "cuda"])
def test_single_row_attention_with_the_gpu_kernels(backend):
    """The prompt through a fused kernel (bf16, head dim 64), the row from the cache: the eager
    row of the same model, up to bf16 rounding."""
    from libra_lm.attention import backend_status

    config = TINY.replace(hidden_size=256, num_attention_heads=4, intermediate_size=512)
    model = random_model(seed=8, backend=backend, config=config, scale=0.06).to("cuda", torch.bfloat16)
    ok, reason = backend_status(backend, torch.zeros(1, 1, 8, 64, device="cuda", dtype=torch.bfloat16))
    if not ok:
        pytest.skip(f"{backend} cannot run here: {reason}")
    ids, feats = mixed_batch(config, [[("t", 3), ("i", 40), ("t", 9)], [("t", 7), ("i", 44), ("t", 1)]], seed=9)
    ids, feats = ids[:, :-2].cuda(), feats[:, :-2].cuda()
    rows = last_token_attention(model, ids, feats)
    full = eager_probabilities(model, ids, feats.to(torch.bfloat16), None)
    torch.testing.assert_close(rows, full[:, :, :, -1], rtol=5e-2, atol=1e-2)
    assert torch.allclose(rows.sum(-1), torch.ones((), device="cuda"), atol=1e-3)


def test_the_bridge_matters_to_the_row():
    """With the bridges zeroed, a query's cross-modal keys change: the row must follow the model."""
    model = random_model(seed=3)
    ids, feats = mixed_batch(TINY, [[("t", 3), ("i", 4), ("t", 3)]], seed=4)
    before = last_token_attention(model, ids, feats)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "bridge" in name:
                p.zero_()
    after = last_token_attention(model, ids, feats)
    torch.testing.assert_close(after, eager_probabilities(model, ids, feats, None)[:, :, :, -1], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(before, after, atol=1e-4)


def prompts_with_images(text_tok, questions, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for q in questions:
        ids = torch.randint(0, TINY.codebook_size, (P, 2), generator=g)
        image = image_segment(ids, torch.randn(P, TINY.contiguous_signal_size, generator=g), TINY)
        out.append(build_prompt(text_tok, TINY, q, image))
    return out


def test_answer_attention_takes_each_prompts_patches(text_tok):
    model = random_model(seed=5)
    prompts = prompts_with_images(text_tok, ["What is in the image?", "How many people are there in the photo?"])
    given = text_tok.encode("cat")[0]
    result = answer_attention(model, prompts, [given, None])
    assert result.maps.shape == (TINY.num_hidden_layers, 2, TINY.num_attention_heads, P)
    # The generated answer is the model's greedy first token.
    greedy = generate(model, *collate_prompts([prompts[1]], TINY), max_new_tokens=1)
    assert result.answer_ids == [given, greedy.sequences[0, 0, 0].item()]
    for i, prompt in enumerate(prompts):  # each row alone, the answer appended: its patch columns
        seq = torch.cat([prompt.ids, torch.full((1, 2), result.answer_ids[i])])[None]
        feats = torch.cat([prompt.features, torch.zeros(1, TINY.contiguous_signal_size)])[None]
        rows = last_token_attention(model, seq, feats)
        patches = (seq[0, :, 0] >= V_T) & (seq[0, :, 0] < TINY.boi_token_id)
        torch.testing.assert_close(result.maps[:, i], rows[:, 0][:, :, patches], rtol=1e-4, atol=1e-6)


def test_answer_attention_checks_its_prompts(text_tok):
    model = random_model()
    prompt = prompts_with_images(text_tok, ["What is it?"])[0]
    with pytest.raises(ValueError, match="prompt 0 must hold exactly one image"):
        answer_attention(model, [build_prompt(text_tok, TINY, "What is it?")])
    with pytest.raises(ValueError, match="prompt 0 ends inside or at its image"):
        end = int((prompt.ids[:, 0] == TINY.eoi_token_id).nonzero()) + 1  # the prompt cut after its EOI
        answer_attention(model, [type(prompt)(prompt.ids[:end], prompt.features[:end])])
    with pytest.raises(ValueError, match=r"an answer token must be a text id in \[0, 320\)"):
        answer_attention(model, [prompt], [V_T])


# ---- the difference metrics of Fig. 7 --------------------------------------------------------------------
def transcribed_differences(maps, per_head=False):
    """The paper's formulas written out with loops (Fig. 4 b, c captions; Fig. 7 with its means
    over every dimension but the layer)."""
    L, B, H, N = maps.shape
    a = [[[[float(maps[l, b, h, n]) for n in range(N)] for h in range(H)] for b in range(B)] for l in range(L)]  # noqa: E741
    top = max(v for layer in a for sample in layer for head in sample for v in head)
    a = [[[[v / top for v in head] for head in sample] for sample in layer] for layer in a]
    cross, inner = [], []
    for l in range(L):  # noqa: E741
        total = 0.0
        if per_head:
            for b in range(B):
                for h in range(H):
                    for n in range(N):
                        mean_over_layers = sum(a[k][b][h][n] for k in range(L)) / L
                        total += abs(a[l][b][h][n] - mean_over_layers)
            cross.append(total / (B * H * N))
        else:
            for b in range(B):
                for n in range(N):
                    layer_score = sum(a[l][b][h][n] for h in range(H)) / H  # averaged across all heads
                    mean_over_layers = sum(sum(a[k][b][h][n] for h in range(H)) / H for k in range(L)) / L
                    total += abs(layer_score - mean_over_layers)
            cross.append(total / (B * N))
        total = 0.0
        for b in range(B):
            for h in range(H):
                for n in range(N):
                    mean_over_heads = sum(a[l][b][k][n] for k in range(H)) / H
                    total += abs(a[l][b][h][n] - mean_over_heads)
        inner.append(total / (B * H * N))
    return cross, inner


@pytest.mark.parametrize("mode", ["heads-mean", "per-head"])
def test_differences_equal_the_papers_formulas(mode):
    maps = torch.rand(5, 3, 4, 7, generator=torch.Generator().manual_seed(0)) * 0.3
    cross, inner = attention_differences(maps, cross_layer=mode)
    expected_cross, expected_inner = transcribed_differences(maps, per_head=mode == "per-head")
    assert cross.tolist() == pytest.approx(expected_cross, rel=1e-9)
    assert inner.tolist() == pytest.approx(expected_inner, rel=1e-9)
    # Samples added in parts give the result of all of them at once (one global maximum).
    acc = DifferenceAccumulator(mode)
    acc.add(maps[:, :1])
    acc.add(maps[:, 1:])
    parts_cross, parts_inner = acc.result()
    assert parts_cross.tolist() == pytest.approx(expected_cross, rel=1e-9)
    assert parts_inner.tolist() == pytest.approx(expected_inner, rel=1e-9)


def test_the_literal_pseudo_code_does_not_run():
    """Fig. 7 as printed: its chained means index dimensions that earlier means removed."""
    attn_maps = torch.rand(5, 3, 4, 7)
    attn_maps = attn_maps / attn_maps.max()
    layer_mean = attn_maps.mean(dim=0)
    cross_layer_difference = (attn_maps - layer_mean).abs()
    with pytest.raises(IndexError):
        cross_layer_difference.mean(dim=1).mean(dim=2).mean(dim=3)
    with pytest.raises(ValueError, match="cross_layer must be one of"):
        DifferenceAccumulator("layers")


def test_default_heatmap_layers():
    assert default_heatmap_layers(32) == [0, 10, 21, 31]
    assert default_heatmap_layers(2) == [0, 1]


def test_question_files(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text('{"question_id": 7, "image": "a.png", "text": "What?"}\n\n{"image": "b.png", "question": "Who?", '
                    '"answer": "cat"}\n{"image": "c.png", "text": "Why?"}\n')
    questions = read_questions(path, limit=2)
    assert [(q.question_id, q.image, q.text, q.answer) for q in questions] == \
        [("7", "a.png", "What?", None), ("3", "b.png", "Who?", "cat")]
    path.write_text('{"image": "a.png"}\n')
    with pytest.raises(ValueError, match=r"q.jsonl:1: a question needs \"image\" \(a file name\) and \"text\""):
        read_questions(path)
    path.write_text('{"image": "a.png", "text": "x"}\nnot json\n')
    with pytest.raises(ValueError, match=r"q.jsonl:2: not a JSON object"):
        read_questions(path)


# ---- `libra-lm attention`, offline --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def two_models(tmp_path_factory, sp):
    root = tmp_path_factory.mktemp("attention")
    for name, seed in (("libra", 6), ("no-bridge", 7)):
        model = random_model(seed=seed)
        if name == "no-bridge":
            with torch.no_grad():
                for param_name, p in model.named_parameters():
                    if "bridge" in param_name:
                        p.zero_()
        model.save_pretrained(root / name)
        (root / name / "tokenizer.model").write_bytes(sp.read_bytes())
    return root


def test_attention_command_writes_curves_plot_and_heatmaps(two_models, asset_images, text_tok, tmp_path):
    from libra_tok.pipeline import load_tokenizer

    images = asset_images[0].parent
    questions = tmp_path / "questions.jsonl"
    rows = [{"question_id": f"q{i}", "image": p.name, "text": "What is in the image?\nAnswer the question using a "
             "single word or phrase."} for i, p in enumerate(asset_images[:3])]
    rows[1]["answer"] = "cat"
    questions.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "report"
    args = ["attention", "--model", str(two_models / "libra"), "--model", str(two_models / "no-bridge"),
            "--questions", str(questions), "--images", str(images), "--out", str(out), "--tokenizer-preset", "tiny",
            "--device", "cpu", "--batch-size", "2", "--heatmaps", "2", "--heatmap-layers", "1,2"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "(3 question(s), 2 model(s))" in result.output
    report = json.loads((out / "attention.json").read_text())
    assert report["cross_layer_mode"] == "heads-mean" and [m["label"] for m in report["models"]] == \
        ["libra", "no-bridge"]
    # The curves are those of the library on the same questions.
    tok = load_tokenizer(preset="tiny", device="cpu")
    pixels = tok.preprocess(asset_images[:3])
    encoded = tok.encode(pixels)
    prompts = [build_prompt(text_tok, TINY, r["text"], image_segment(encoded.ids[i], encoded.features[i], TINY))
               for i, r in enumerate(rows)]
    for entry in report["models"]:
        model = LibraForCausalLM.from_pretrained(two_models / entry["label"])
        expected = answer_attention(model, prompts, [None, text_tok.encode("cat")[0], None])
        cross, inner = attention_differences(expected.maps)
        assert entry["cross_layer"] == pytest.approx(cross.tolist(), rel=1e-4)
        assert entry["inner_layer"] == pytest.approx(inner.tolist(), rel=1e-4)
        assert (entry["samples"], entry["layers"], entry["heads"]) == (3, 2, 4)
        assert [a["answer_token"] for a in entry["answers"]] == expected.answer_ids
        assert [a["given"] for a in entry["answers"]] == [False, True, False]
        heatmaps = sorted(p.name for p in (out / "heatmaps" / entry["label"]).iterdir())
        assert heatmaps == ["q0.png", "q1.png"]
    assert report["models"][0]["cross_layer"] != report["models"][1]["cross_layer"]
    with Image.open(out / "attention_differences.png") as plot:
        assert plot.format == "PNG" and plot.width > 800 and plot.info["Software"].startswith("Matplotlib")
    with Image.open(out / "heatmaps" / "libra" / "q0.png") as heatmap:
        assert heatmap.width > 3 * heatmap.height // 2  # the image and two layers side by side


def test_attention_command_errors_are_one_line(two_models, asset_images, tmp_path):
    questions = tmp_path / "questions.jsonl"
    questions.write_text(json.dumps({"image": "missing.png", "text": "What?"}) + "\n")
    base = ["attention", "--model", str(two_models / "libra"), "--questions", str(questions), "--images",
            str(asset_images[0].parent), "--out", str(tmp_path / "o"), "--tokenizer-preset", "tiny", "--device", "cpu"]
    assert cli_error(CliRunner().invoke(main, base)) == (
        f"Error: 1 image(s) of the questions are not in {asset_images[0].parent}, e.g. 'missing.png'; --images must "
        "be the folder the questions' \"image\" names refer to")
    questions.write_text(json.dumps({"image": asset_images[0].name, "text": "What?"}) + "\n")
    assert cli_error(CliRunner().invoke(main, [*base, "--heatmap-layers", "3"])) == \
        "Error: heatmap layer 3 does not exist: libra has 2 layers"
    result = CliRunner().invoke(main, [*base, "--heatmap-layers", "0,1"])
    assert result.exit_code == 2 and "layers are numbered from 1" in result.output


def test_models_of_the_same_folder_name_get_their_parents_name():
    from pathlib import Path

    from libra_cli.lm_visual import _labels

    assert _labels((Path("runs/a/final"), Path("runs/b/final"), Path("runs/c"))) == ["a-final", "b-final", "c"]
    assert _labels((Path("x/final"), Path("y/x/final"))) == ["x-final-1", "x-final-2"]
