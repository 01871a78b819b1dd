"""Official checkpoints of any shape: a file in each method's official layout, of a size no preset has (width 48,
3 heads, depth 3), goes through ``python -m models.convert`` and the entry scripts (--resume, --finetune,
main_linprobe.py, --eval) and computes what the model built directly computes. The official layout is written by
inverse mappings kept here, independent of the converters."""
import argparse
import dataclasses
import re
import shlex

import pytest
import torch
import torch.nn.functional as F

import main_finetune
import main_linprobe
import main_pretrain
import main_slimmable
import models  # noqa: F401  (registers the methods)
from models import convert
from models.formats import load_checkpoint, load_encoder_weights, model_from_checkpoint
from models.registry import METHODS
from models.scala import ScalaConfig, SlimmableViT
from models.vit import VisionTransformer
from tests.helpers import FAST, ROOT, run_script
from util.settings import SettingsError

SIZE = dict(input_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=3, drop_path=0.0)
CONFIGS = {
    "xtra": dict(SIZE, block_size=2, predictor_depth=1, predictor_width=24, predictor_heads=2, proj_hidden=32,
                 head_hidden=64),
    "saim": dict(SIZE, query_depth=3, gaussian_kernel_size=3, gaussian_sigma=0.5),
    "digpt": dict(SIZE, segment_size=2, enc_layers=(2, 3), decoder_dim=24, decoder_depth=1, decoder_heads=2,
                  teacher_dim=16, teacher_grid=4),
    "mae": dict(SIZE, decoder_dim=24, decoder_depth=1, decoder_heads=2),
}
# What the official layout does not show and a file without records leaves to the command line
UNRECORDED = {"xtra": {"predictor_heads": 2}, "saim": {}, "digpt": {"enc_layers": (2, 3), "decoder_heads": 2},
              "mae": {"decoder_heads": 2}}


def _split(qkv: torch.Tensor, parts: list[str], prefix: str) -> dict:
    sizes = [qkv.shape[0] // 3] * 3
    return dict(zip([f"{prefix}.{p}" for p in parts], qkv.split(sizes)))


def to_official(key: str, model) -> dict:
    """The model's weights under the official key names and layout of its method."""
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    if key == "xtra":
        return {("enc." + k[8:] if k.startswith("encoder.") else k): v for k, v in sd.items()}
    if key == "mae":
        return {(k[8:] if k.startswith("encoder.") else k): v for k, v in sd.items()}
    if key == "saim":
        out = {"gaussian_blur.weight": model.gaussian_blur.weight.clone()}
        for k, v in sd.items():
            k = k[8:] if k.startswith("encoder.") else k
            if ".attn.qkv." in k:  # separate q, k, v projections
                base, kind = k.split(".attn.qkv.")
                out.update({f"{base}.attn.{p}.{kind}": t for p, t in zip("qkv", v.chunk(3))})
            else:
                out[k] = v
        return out
    # D-iGPT: the next-segment decoder is the official "ar" one but reads the "kd" memory, and vice versa
    out = {k[8:]: v for k, v in sd.items() if k.startswith("encoder.") and "fc_norm" not in k}
    taps = len(model.enc_layers)
    for official, ours, memory in (("ar", "next", "kd"), ("kd", "vis", "ar")):
        for j in range(taps):
            out[f"{memory}_enc_norm.{j}.weight"] = sd[f"{ours}_feat_norm.weight"]
            out[f"{memory}_enc_norm.{j}.bias"] = sd[f"{ours}_feat_norm.bias"]
        for p in ("weight", "bias"):
            out[f"{memory}_enc2dec.{p}"] = sd[f"{ours}_enc2dec.{p}"]
            out[f"{official}_norm.{p}"] = sd[f"{ours}_norm.{p}"]
            out[f"{official}_pred.{p}"] = sd[f"{ours}_pred.{p}"]
        out[f"{official}_token"] = sd[f"{ours}_query"]
        for k, v in sd.items():
            if not k.startswith(f"{ours}_blocks."):
                continue
            rest = f"{official}_blocks." + k[len(f"{ours}_blocks."):]
            if ".attn2.qkv." in rest:
                base, p = rest.split(".attn2.qkv.")
                q, kv = v.split([v.shape[0] // 3, 2 * v.shape[0] // 3])
                out[f"{base}.attn2.q.{p}"], out[f"{base}.attn2.kv.{p}"] = q, kv
            else:
                out[rest] = v
    n = model.mask.shape[0]  # the official additive buffer of the same pattern
    out["mask"] = torch.zeros(n, n).masked_fill(~model.mask, float("-inf"))
    out["decoder_pos_embed"] = model.decoder_pos_embed.clone()
    return out


def _direct(key: str):
    torch.manual_seed(0)
    method = METHODS[key]
    model = method.model_class(method.config_class(**CONFIGS[key])).eval()
    for p in model.parameters():  # non-trivial LayerNorms and biases, so that a wrong mapping shows
        p.data.add_(torch.randn_like(p) * 0.05)
    return model


def _outputs(key: str, model, x: torch.Tensor) -> torch.Tensor:
    if key == "xtra":
        return model.forward_with_outputs(x)[1]["pred"]
    order = torch.stack([torch.randperm(16, generator=torch.Generator().manual_seed(i)) for i in range(len(x))])
    if key == "saim":
        return model.forward_with_outputs(x, order)[1]["pred"]
    if key == "mae":
        return model.forward_with_outputs(x, order)[1]["pred"]
    return torch.cat(model.predict(x, torch.tensor([2, 0, 3, 1])), dim=1)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def converted(request, tmp_path_factory):
    """(method key, the model built directly, the official file, the converted file)."""
    key, d = request.param, tmp_path_factory.mktemp(request.param)
    model = _direct(key)
    torch.save({"model": {f"module.{k}": v for k, v in to_official(key, model).items()}, "epoch": 9},
               d / "official.pth")
    with pytest.raises(ValueError, match="give --num_heads"):  # the file records no model name
        convert.main(["--from", key, str(d / "official.pth"), str(d / "converted.pth")])
    assert not (d / "converted.pth").exists()
    convert.main(["--from", key, str(d / "official.pth"), str(d / "converted.pth"), "--num_heads", "3"])
    return key, model, d / "official.pth", d / "converted.pth"


def test_converted_whole_model_computes_what_the_model_built_directly_computes(converted):
    key, model, _, path = converted
    ckpt = load_checkpoint(str(path))
    assert ckpt["model_name"] == key and set(ckpt["unrecorded"]) == set(UNRECORDED[key])
    if UNRECORDED[key]:
        with pytest.raises(ValueError, match="does not record"):
            model_from_checkpoint(ckpt)
    rebuilt = model_from_checkpoint({**ckpt, "model_config": {**ckpt["model_config"], **UNRECORDED[key]},
                                     "unrecorded": []})
    rebuilt.load_state_dict(ckpt["model"], strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(_outputs(key, rebuilt.eval(), x), _outputs(key, model, x))


def test_main_pretrain_resumes_a_converted_file_with_the_unrecorded_settings_given(converted, tmp_path):
    key, model, _, path = converted
    argv = ["--resume", str(path), "--output_dir", str(tmp_path), *FAST]
    if METHODS[key].needs_teacher:  # resolution only checks that the teacher exists
        (tmp_path / "teacher.pth").write_bytes(b"")
        argv += ["--teacher", str(tmp_path / "teacher.pth")]
    if UNRECORDED[key]:
        with pytest.raises(SettingsError, match="does not record"):
            main_pretrain.resolve_settings(argv)
    flags = [w for name, v in UNRECORDED[key].items() for w in (f"--{name}", *map(str, v if isinstance(v, tuple)
                                                                                      else [v]))]
    s, ckpt, ckpt_path = main_pretrain.resolve_settings([*argv, *flags])
    method = METHODS[key]
    assert s.model == key and s.source("embed_dim") == "checkpoint"
    config = s.of(method.config_class)
    resumed = method.model_class(dataclasses.replace(config, teacher="") if method.needs_teacher else config).eval()
    resumed.load_state_dict(ckpt["model"], strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(_outputs(key, resumed, x), _outputs(key, model, x))


def test_finetune_and_probe_take_the_converted_encoder(converted, tmp_path):
    key, model, official, path = converted
    x = torch.randn(2, 3, 32, 32)
    mask = model.encoder_mask.build(4) if model.encoder_mask is not None else None
    expected = model.encoder.get_intermediate_layers(x, 1, mask=mask)[0]
    for source in (path, official):  # the converted file, and the official file directly
        s, init, _, _ = main_finetune.resolve_settings(["--finetune", str(source), "--num_heads", "3",
                                                        "--output_dir", str(tmp_path), *FAST])
        classifier = main_finetune.build_classifier(s, 10, init, None)
        load_encoder_weights(classifier, init)
        with torch.no_grad():
            torch.testing.assert_close(classifier.eval().get_intermediate_layers(x, 1, mask=mask)[0], expected)
        s, init, _, _ = main_linprobe.resolve_settings(["--finetune", str(source), "--num_heads", "3",
                                                        "--probe", "attentive", "--output_dir", str(tmp_path), *FAST])
        probe, backbone = main_linprobe.build_probe(s, init, 10)
        assert (probe.mask is not None) == (key == "xtra")  # XTRA keeps its block-causal mask
        with torch.no_grad():
            torch.testing.assert_close(backbone.get_intermediate_layers(x, 1, mask=probe.mask)[0], expected)


def test_a_missing_head_count_is_one_error_line_and_nothing_is_written(converted, tmp_path):
    key, _, official, _ = converted
    if key != "xtra":
        pytest.skip("one method is enough for the command line")
    proc = run_script("models.convert", "--from", "xtra", str(official), str(tmp_path / "out.pth"), check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "give --num_heads" in proc.stderr
    assert not list(tmp_path.iterdir())
    proc = run_script("main_finetune.py", "--finetune", official, "--output_dir", tmp_path / "ft", *FAST,
                      check=False)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and "--num_heads" in proc.stderr
    assert not (tmp_path / "ft").exists()


def test_an_unloadable_conversion_is_refused(tmp_path):
    model = _direct("xtra")
    official = to_official("xtra", model)
    official["predictor.blocks.0.attn.proj.weight"] = torch.zeros(24, 20)  # a torn file: shapes that do not fit
    torch.save({"state_dict": official, "hyper_parameters": {"enc_num_heads": 3, "predictor_num_heads": 2}},
               tmp_path / "bad.ckpt")
    proc = run_script("models.convert", "--from", "xtra", tmp_path / "bad.ckpt", tmp_path / "out.pth", check=False)
    assert proc.returncode == 2 and "does not load" in proc.stderr and "Traceback" not in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.ckpt"]


# ---- XTRA probe files, SAIM fine-tuned classifiers, Scala ------------------------------------------------------
def _official_attentive_logits(feats: torch.Tensor, head: dict, heads: int) -> torch.Tensor:
    """The official AttentionPoolingClassifier (adapted from apple/ml-aim), written out: BatchNorm over tokens,
    the learned queries scaled by head_dim^-0.5, softmax attention over the tokens, mean over queries, Linear."""
    B, N, C = feats.shape
    x = F.batch_norm(feats.transpose(1, 2), head["classifier.bn.running_mean"], head["classifier.bn.running_var"],
                     eps=1e-6).transpose(1, 2)
    q = head["classifier.cls_token"].expand(B, -1, -1).reshape(B, -1, heads, C // heads).permute(0, 2, 1, 3)
    k = F.linear(x, head["classifier.k.weight"]).reshape(B, N, heads, C // heads).permute(0, 2, 1, 3)
    v = F.linear(x, head["classifier.v.weight"]).reshape(B, N, heads, C // heads).permute(0, 2, 1, 3)
    attn = ((q * (C // heads) ** -0.5) @ k.transpose(-2, -1)).softmax(-1)
    pooled = (attn @ v).transpose(1, 2).reshape(B, -1, C).mean(1)
    return F.linear(pooled, head["classifier.linear.weight"], head["classifier.linear.bias"])


def official_xtra_probe(model) -> tuple[dict, dict]:
    """An official XTRA probe file (Lightning: encoder + attentive head, 4 heads, 2 queries, last 2 blocks) of
    ``model``'s encoder, and its head's tensors."""
    g = torch.Generator().manual_seed(3)
    head = {"classifier.cls_token": torch.randn(1, 2, 48, generator=g) * 0.5,
            "classifier.k.weight": torch.randn(48, 48, generator=g) * 0.2,
            "classifier.v.weight": torch.randn(48, 48, generator=g) * 0.2,
            "classifier.bn.running_mean": torch.randn(48, generator=g) * 0.1,
            "classifier.bn.running_var": torch.rand(48, generator=g) + 0.5,
            "classifier.bn.num_batches_tracked": torch.tensor(100),
            "classifier.linear.weight": torch.randn(10, 48, generator=g), "classifier.linear.bias": torch.zeros(10)}
    encoder = {k: v for k, v in to_official("xtra", model).items() if k.startswith("enc.")}
    records = {"enc_num_heads": 3, "enc_block_size": 2, "cls_n_last_blocks": 2, "cls_avgpool_layers": True,
               "attentive_pooling_num_heads": 4, "attentive_pooling_num_queries": 2}
    return {"state_dict": {f"model.{k}": v for k, v in {**encoder, **head}.items()}, "hyper_parameters": records}, head


def test_official_xtra_attentive_probe_evaluates_its_own_head(tmp_path):
    model = _direct("xtra")
    probe_file, head = official_xtra_probe(model)
    torch.save(probe_file, tmp_path / "probe.ckpt")
    s, init, ckpt, path = main_linprobe.resolve_settings(["--eval", "--resume", str(tmp_path / "probe.ckpt"),
                                                          "--output_dir", "", *FAST])
    assert (s.probe, s.probe_heads, s.num_queries, s.n_last_blocks) == ("attentive", 4, 2, 2)
    probe, _ = main_linprobe.build_probe(s, init, 10)
    probe.load_state_dict(ckpt["model"], strict=True)
    x = torch.randn(4, 3, 32, 32)
    feats = torch.stack(model.encoder.get_intermediate_layers(x, 2, mask=model.encoder_mask.build(4))).mean(0)
    with torch.no_grad():
        torch.testing.assert_close(probe.eval()(x), _official_attentive_logits(feats, head, 4), rtol=1e-4, atol=1e-4)
    proc = run_script("main_linprobe.py", "--eval", "--resume", tmp_path / "probe.ckpt", "--output_dir", "", *FAST)
    assert "Acc@1" in proc.stdout and "(359 images)" in proc.stdout


def _official_scala(tmp_path, distilled: bool = True, args: argparse.Namespace | None = None):
    torch.manual_seed(0)
    model = SlimmableViT(ScalaConfig(**SIZE, nb_classes=10, distilled=distilled)).eval()
    torch.save({"model": model.state_dict(), "epoch": 99, "args": args}, tmp_path / "scala.pth")
    return model


def test_official_scala_args_become_the_defaults_of_eval_and_resume(tmp_path):
    args = argparse.Namespace(model="deit_tiny_custom_distilled_scala", smallest_ratio=0.5, largest_ratio=1.0,
                              granularity=0.25)
    _official_scala(tmp_path, args=args)
    argv = ["--eval", "--resume", str(tmp_path / "scala.pth"), "--num_heads", "3", "--output_dir", "", *FAST]
    s, _, _ = main_slimmable.resolve_settings(argv)
    assert (s.smallest_ratio, s.granularity, s.embed_dim, s.input_size) == (0.5, 0.25, 48, 32)
    assert s.source("granularity") == "checkpoint"
    s, _, _ = main_slimmable.resolve_settings([*argv, "--granularity", "0.5"])  # a flag still wins
    assert s.granularity == 0.5 and s.source("granularity") == "command line"
    proc = run_script("main_slimmable.py", *argv, "--throughput_iters", "1")
    assert "granularity        = 0.25   [checkpoint]" in proc.stdout
    table = proc.stdout.split("top-1")[-1]
    assert [line.split()[0] for line in table.strip().splitlines()[1:4]] == ["0.5", "0.75", "1"]


def test_init_from_an_official_scala_file_and_the_plain_layout(tmp_path):
    official = _official_scala(tmp_path, args=argparse.Namespace(model="deit_tiny_custom_distilled_scala"))
    init = load_checkpoint(str(tmp_path / "scala.pth"), num_heads=3)
    model = SlimmableViT(ScalaConfig(**SIZE, nb_classes=10))
    load_encoder_weights(model, init)
    for k, v in official.state_dict().items():
        torch.testing.assert_close(model.state_dict()[k], v)
    plain = _official_scala(tmp_path, distilled=False, args=argparse.Namespace(model="deit_tiny_patch8_scala"))
    ckpt = load_checkpoint(str(tmp_path / "scala.pth"), num_heads=3)
    assert ckpt["converted_from"] == "scala" and ckpt["model_config"]["distilled"] is False
    rebuilt = model_from_checkpoint(ckpt)
    rebuilt.load_state_dict(ckpt["model"], strict=True)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(rebuilt.eval()(x, 0.5), plain(x, 0.5))
    _official_scala(tmp_path, distilled=False)  # no record says it is Scala: a plain ViT classifier
    with pytest.raises(SettingsError, match="not a Scala checkpoint"):
        main_slimmable.resolve_settings(["--eval", "--resume", str(tmp_path / "scala.pth"), "--num_heads", "3",
                                         "--output_dir", "", *FAST])


# ---- the table of released checkpoints in docs/checkpoints.md ------------------------------------------------
def _released_table() -> list[dict]:
    """The rows of docs/checkpoints.md's table of released checkpoints, as {column: cell}; ``file`` and
    ``command`` hold the cell's (first) backticked text."""
    text = (ROOT / "docs" / "checkpoints.md").read_text()
    table = text[text.index("### Released checkpoints"):].split("\n\n| method |", 1)[1]
    lines = ("| method |" + table).split("\n\n")[0].splitlines()
    columns = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = [dict(zip(columns, (c.strip() for c in line.strip().strip("|").split(" | ")))) for line in lines[2:]]
    for row in rows:
        for column in ("file", "command"):
            row[column] = re.search(r"`([^`]+)`", row[column]).group(1)
    return rows


def _official_layout_file(method: str, kind: str, name: str) -> dict:
    """A small file in the official layout of a released checkpoint (width 48, 3 heads, 3 blocks, 32 px)."""
    vit = dict(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=3)
    if kind == "classifier" and method == "SAIM":  # separate q/k/v, cls-token classifier
        sd = {k: v for k, v in to_official("saim", _direct("saim")).items()
              if not k.startswith(("query_blocks.", "prediction_head.", "gaussian_blur."))}
        return {"model": {**sd, "head.weight": torch.zeros(10, 48), "head.bias": torch.zeros(10)}}
    if kind == "classifier":  # D-iGPT's and MAE's fine-tuned files: timm ViTs, global pool + fc_norm
        return {"model": VisionTransformer(**vit, num_classes=10, global_pool="avg", fc_norm=True).state_dict()}
    if kind == "encoder":  # MAE's mae_pretrain_vit_*.pth
        return {"model": VisionTransformer(**vit, num_classes=0, global_pool="token").state_dict()}
    if kind == "slimmable":
        return {"model": SlimmableViT(ScalaConfig(**SIZE, nb_classes=10)).state_dict(), "epoch": 99}
    if kind == "probe":
        return official_xtra_probe(_direct("xtra"))[0]
    key = {"XTRA": "xtra", "SAIM": "saim", "D-iGPT": "digpt", "MAE": "mae"}[method]
    sd = to_official(key, _direct(key))
    if key == "xtra":  # Lightning (B/16) or DeepSpeed (H/14)
        return {"state_dict": {f"model.{k}": v for k, v in sd.items()},
                "hyper_parameters": {"enc_num_heads": 3, "predictor_num_heads": 2}} if name.endswith(".ckpt") \
            else {"module": sd}
    return {"model": sd, "epoch": 99}


def test_every_released_checkpoint_command_parses_on_a_file_of_its_layout(tmp_path):
    """Each command of the table, with the file replaced by a small one in the same official layout and the head
    counts by the small file's (3), parses and resolves (the checkpoint converted) under --print_config."""
    rows = _released_table()
    assert {r["method"] for r in rows} == {"XTRA", "SAIM", "D-iGPT", "MAE", "Scala"}
    for row in rows:
        path = tmp_path / row["file"]
        torch.save(_official_layout_file(row["method"], row["kind"], path.name), path)
        words = shlex.split(row["command"])
        start = next(i for i, w in enumerate(words) if w.endswith(".py"))
        assert words[0] in ("python", "torchrun") and row["file"] in words, row["command"]
        argv = [str(path) if w == path.name else w for w in words[start + 1:]]
        for flag in ("--num_heads", "--probe_heads"):
            if flag in argv:
                argv[argv.index(flag) + 1] = "3"
        proc = run_script(words[start], *argv, "--print_config", check=False)
        assert proc.returncode == 0, f"{row['command']}\n{proc.stderr[-2000:]}"
        assert "[command line]" in proc.stdout
