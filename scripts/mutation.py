"""Mutation testing with mutmut 3, one module at a time: which changes to the code the tests miss.

    make mutation MODULE=vit_service/preprocessing.py      # (python scripts/mutation.py run MODULE)
    make mutation-report                                   # the markdown table for tests/README.md

MODULES below is the one list: each module users rely on, with the fast tests that exercise it
in-process. mutmut records which of those tests reach each function and runs, per mutant, only
those (tests that reach the code through a subprocess or a server are not seen, so the module's
in-process tests are the ones that count). Each module runs in its own folder,
.mutation/<module>/ (mutmut's `mutants/` copy and its result cache, out of git), so a module's
results survive another module's run and an interrupted run continues where it stopped.
EQUIVALENT lists the surviving mutants that cannot change behaviour, each with its reason.
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORK = REPO / ".mutation"
MUTMUT = Path(sys.executable).parent / "mutmut"
FAST = ["-m", "not slow"]

# module (a glob where a package) -> pytest arguments selecting its fast, in-process tests.
MODULES: dict[str, list[str]] = {
    # torch.compile cannot trace mutmut's trampolines (fullgraph fails in the stats run): compile tests left out
    "vit_service/model.py": ["tests/test_model.py", "-k", "not compile"],
    "vit_service/preprocessing.py": ["tests/test_preprocessing.py", "tests/test_folder_dataset.py",
                                     "tests/test_explain.py::test_crop_box_is_the_region_the_model_sees"],
    "vit_service/artifact.py": ["tests/test_artifact.py", "tests/test_checkpoints.py", "tests/test_calibration.py", "-k",
                                "not export and not server and not http"],
    "vit_service/explain.py": ["tests/test_explain.py"],
    "vit_service/calibration.py": ["tests/test_calibration_math.py", "tests/test_calibration.py", "-k",
                                   "not backend and not raw_setting and not export and not artifact and not server"],
    # the inference backends (registry, Predictor, runtimes, the kept decision): their in-process tests;
    # those starting a real server, or exporting through a vit-export subprocess (int8_models, the
    # demo run), are left out: a server is not traced and a fixture's export would run per mutant
    "vit_service/backends/*.py": ["tests/test_backends.py", "tests/test_serving_speed.py", "tests/test_calibration.py",
                                  "tests/test_onnx.py", "tests/test_serving_decisions.py", "tests/test_host.py",
                                  *[f"tests/test_service.py::{t}" for t in (
                                      "test_in_process_classify_images", "test_in_process_errors_carry_status",
                                      "test_model_handle_predict_and_describe", "test_device_and_precision_choices",
                                      "test_bf16_autocast_stays_close_to_fp32", "test_cpu_precision_rule",
                                      "test_cpu_bf16_is_a_candidate_the_decision_keeps_by_its_timings_and_runs")],
                                  "-k", "not server and not http and not export and not two_workers_give and "
                                        "not openvino_serves and not int8_guard_at_serving"],
    "vit_service/host.py": ["tests/test_host.py",
                            "tests/test_backends.py::test_candidates_follow_the_flags_the_guard_and_the_settings",
                            "tests/test_backends.py::test_the_rule_keeps_the_trusted_candidate_unless_ten_percent_faster"],
    # int8: the tiny model quantized in-process; the demo run's export (a subprocess) is left out
    "vit_service/quantize.py": ["tests/test_int8.py", "-k", "guard_rule or tiny"],
    # training: the tests that fit, validate, test, predict or resume through the CLI in this process
    # (run_cli_in_process) or build the data module; their vit-train subprocesses are not followed
    "training/module.py": ["tests/test_recipe.py", "tests/test_training.py", "tests/test_run_layout.py",
                           "tests/test_memory_data.py", "tests/test_report.py", "tests/test_cli_promises.py"],
    "training/data.py": ["tests/test_recipe.py", "tests/test_memory_data.py", "tests/test_folder_dataset.py",
                         "tests/test_training.py", "tests/test_run_layout.py", "tests/test_shards.py",
                         "tests/test_cli_promises.py"],
    "training/callbacks/*.py": ["tests/test_short_recipe.py"],
    # vit-export's steps in-process (test_export_steps.py); its whole runs are subprocesses mutmut cannot follow
    "training/export.py": ["tests/test_export_steps.py",
                           "tests/test_docs.py::test_the_command_reference_is_what_the_commands_print"],
    "vit_service/serving/validation.py": ["tests/test_validation.py"],
    # auth.py and errors.py: their middleware in-process (httpx's ASGI transport) and their pure parts;
    # the served checks (test_auth.py, test_error_shape.py) go through a server mutmut cannot follow
    "vit_service/serving/auth.py": ["tests/test_auth_middleware.py", *[f"tests/test_auth.py::{t}" for t in (
        "test_the_protected_routes_are_read_from_the_service", "test_keys_from_the_variable_and_the_file",
        "test_auth_is_off_by_default_and_open_paths", "test_bad_key_settings_are_start_up_errors",
        "test_empty_key_file_is_an_error_not_an_open_api")]],
    "vit_service/serving/errors.py": ["tests/test_error_middleware.py",
                                      "tests/test_error_shape.py::test_other_error_bodies_are_reshaped",
                                      "tests/test_validation.py",
                                      "tests/test_service.py::test_upload_cut_short_is_answered_408_json"],
}

# Survivors that cannot change behaviour: mutant name -> (its mutated line, as `mutmut show`
# prints it after "+", and why no test can tell). A listed mutant whose line changed is reported
# as stale, so a new mutant never inherits an old reason.
_ZERO_SIZE = "unreachable: Pillow refuses a zero width or height at open (PNG, BMP, JPEG; a GIF takes its frame's size)"
_DRAFT_MODE = ("the draft's mode only asks libjpeg for a colour conversion _to_rgb makes anyway: the same pixels for "
               "RGB, L and CMYK JPEGs (checked); the scale is what matters")
_CLAMPED = "Pillow clamps a colour value of 256 to 255"
_RGB_COPY = "convert('RGB') of an RGB image is an equal copy"
_DTYPE = ("Pillow's array already has that dtype (uint16 for I;16, float32 for F, uint8 for RGB; int32 for I, equal "
          "to uint32 for the non-negative values images hold)")
_FLOAT64 = "float64 instead of float32 gives the same 8-bit value for every 16-bit input (all 65,536 checked)"
_INITIAL = "`initial` only matters for an array without pixels (refused before), or picks the same branch"
_EXACT_PEAK = "at a maximum of exactly 65535 both branches divide by 65535"
_L_MODE = "Image.fromarray of a 2-D uint8 array infers mode L"
_CLIP = "the values are within [0.5, 255.5] before the cast, so the bound never binds (uint8(255.5) = 255)"
_I16L = "no decoder opens a file as I;16L (Pillow opens little-endian 16-bit PNG and TIFF as I;16; checked)"
_F32_ONE = "in float32 arithmetic 1.000000000001 is 1.0"
_SQUARE = "for a square image both branches give (short, short)"
_ONE_PX = "differs only for a resize size of 1 px (the longer side is >= the shorter side >= the resize size)"
_CPU = "the same on the CPU; on CUDA the constants would stay on the CPU: only a GPU run can tell"
_OPTIMIZER = ("another LBFGS setting (max_iter 101 or 20, lr 1 or 1.5) reaching the same minimum: within 3e-5 "
              "(relative) of a golden-section oracle, as the original is, at T 0.5 and 2.5, and both bounds")
_AT_MOST_1 = "a confidence is at most 1, so ceil(confidence x bins) - 1 <= bins - 1 and the upper bound never binds"
_WEIGHTS = "np.bincount casts its weights to float64 itself"
_NOT_INT8 = "only precision 'int8' changes the figures; any other default reads the same"
_P = "vit_service.preprocessing."
_Q = "vit_service.quantize."
_HINT = ("compile_for_cpu compiles every precision but fp32 and bf16 as it compiles int8 (the hint from the CPU's "
         "flags): any other value is int8")
_THREADS = "no caller passes threads, so it is always None (OpenVINO's default)"
_C = "vit_service.calibration."
_E = "vit_service.serving.errors."
_M = "vit_service.model."
_X = "vit_service.explain."
_R = "vit_service.artifact."
_INT64 = "NumPy makes a list of Python ints int64 by itself (Linux, 64-bit): the dtype given is the same"
_TIMER_ARGS = ("Lightning's Timer reads only the trainer in on_train_batch_end and nothing in on_train_start "
               "(lightning 2.x source): the other arguments are never used; its interval defaults to 'step' and "
               "verbose=None is false")
_SCRATCH = "the scratch folder's and its subfolders' names are never shown or read: the files are copied out by name"
_FP16 = ("OpenVINO's fp16 compression leaves an NNCF int8 model's constants f32: the same .xml and .bin "
         "(checked on the tiny model, 124,720 bytes either way)")
_VALIDATE = ("validate only raises where a pattern matches no node; both recipes' patterns (none, and the patch "
             "embedding) are valid on the converted ViT, so True, None (false) and the default give the same scope")
_SYNC = ("syncing or rank-zero logging only matters with several processes (test_ddp.py's ranks are subprocesses "
         "mutmut does not follow)")
_LOGITS_2D = "logits are 2-D (B, K): dimension 1 is dimension -1"
_TOPK_DIM = "topk's default dimension is -1"
_F32 = "torch.eye's default dtype is float32 (torch's default dtype, never changed here)"
_REENTRANT = ("the reentrant and non-reentrant checkpoints give the same outputs and gradients for a block whose "
              "input requires grad (always: it follows the patch embedding); None is True with a warning")
_A = "vit_service.serving.auth."
_CODEC = "codec names are case-insensitive: the same codec"
_FALSY = "None and False (or a missing key's None) are both false where the value is only tested"
_NO_PINNING = ("pinned memory is asked for only with CUDA: without it the value is False, as None or the "
               "loader's default (False) are; only a GPU run can tell")
_OWN_CLASSES = ("the module's class list is find_classes(train_dir), which ImageFolderDataset computes itself "
                "when given none: the same list")
EQUIVALENT: dict[str, tuple[str, str]] = {
    _P + "x__open__mutmut_9": ("if width < 1 and height < 1:", _ZERO_SIZE),
    _P + "x__open__mutmut_14": ("raise InvalidImageError(None)", _ZERO_SIZE),
    _P + "x__open__mutmut_23": ("img.draft(None, (draft_size, draft_size))  # keeps both sides >= draft_size", _DRAFT_MODE),
    _P + "x__open__mutmut_27": ('img.draft("XXRGBXX", (draft_size, draft_size))  # keeps both sides >= draft_size',
                                _DRAFT_MODE),
    _P + "x__open__mutmut_28": ('img.draft("rgb", (draft_size, draft_size))  # keeps both sides >= draft_size', _DRAFT_MODE),
    _P + "x__to_rgb__mutmut_6": ('if img.mode in ("I;16", "I;16B", "XXI;16LXX", "I"):', _I16L),
    _P + "x__to_rgb__mutmut_7": ('if img.mode in ("I;16", "I;16B", "i;16l", "I"):', _I16L),
    _P + "x__to_rgb__mutmut_11": ('arr = np.asarray(img, dtype=np.uint32 if img.mode == "I" else np.uint16).astype(None)',
                                  _FLOAT64),
    _P + "x__to_rgb__mutmut_13": ("arr = np.asarray(img, dtype=None).astype(np.float32)", _DTYPE),
    _P + "x__to_rgb__mutmut_15": ("arr = np.asarray(img, ).astype(np.float32)", _DTYPE),
    _P + "x__to_rgb__mutmut_17": ('arr = np.asarray(img, dtype=np.uint32 if (img.mode == "I") or True else np.uint16)'
                                  '.astype(np.float32)', _DTYPE),
    _P + "x__to_rgb__mutmut_25": ("peak = 65535.0 if arr.max(initial=None) <= 65535 else float(arr.max())", _INITIAL),
    _P + "x__to_rgb__mutmut_26": ("peak = 65535.0 if arr.max(initial=1) <= 65535 else float(arr.max())", _INITIAL),
    _P + "x__to_rgb__mutmut_27": ("peak = 65535.0 if arr.max(initial=0) < 65535 else float(arr.max())", _EXACT_PEAK),
    _P + "x__to_rgb__mutmut_32": ("img = Image.fromarray(np.clip(arr / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), None)",
                                  _L_MODE),
    _P + "x__to_rgb__mutmut_34": ("img = Image.fromarray(np.clip(arr / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), )",
                                  _L_MODE),
    _P + "x__to_rgb__mutmut_37": ('img = Image.fromarray(np.clip(arr / peak * 255.0 + 0.5, None, 255).astype(np.uint8), "L")',
                                  _CLIP),
    _P + "x__to_rgb__mutmut_38": ('img = Image.fromarray(np.clip(arr / peak * 255.0 + 0.5, 0, None).astype(np.uint8), "L")',
                                  _CLIP),
    _P + "x__to_rgb__mutmut_48": ('img = Image.fromarray(np.clip(arr / peak * 255.0 + 0.5, 0, 256).astype(np.uint8), "L")',
                                  _CLIP),
    _P + "x__to_rgb__mutmut_56": ("arr = np.asarray(img, dtype=None)", _DTYPE),
    _P + "x__to_rgb__mutmut_58": ("arr = np.asarray(img, )", _DTYPE),
    _P + "x__to_rgb__mutmut_68": ("img = Image.fromarray(((arr - lo) / max(hi - lo, 1e-12) * 255.0).astype(np.uint8), None)",
                                  _L_MODE),
    _P + "x__to_rgb__mutmut_70": ("img = Image.fromarray(((arr - lo) / max(hi - lo, 1e-12) * 255.0).astype(np.uint8), )",
                                  _L_MODE),
    _P + "x__to_rgb__mutmut_80": ('img = Image.fromarray(((arr - lo) / max(hi - lo, 1.000000000001) * 255.0)'
                                  '.astype(np.uint8), "L")', _F32_ONE),
    **{_P + f"x__to_rgb__mutmut_{n}": (f"background = Image.new(\"RGBA\", rgba.size, {rgba})", _CLAMPED)
       for n, rgba in [(108, (256, 255, 255, 255)), (109, (255, 256, 255, 255)), (110, (255, 255, 256, 255)),
                       (111, (255, 255, 255, 256))]},
    _P + "x__to_rgb__mutmut_119": ('return img if (img.mode == "RGB") and False else img.convert("RGB")', _RGB_COPY),
    _P + "x__to_rgb__mutmut_122": ('return img if img.mode == "XXRGBXX" else img.convert("RGB")', _RGB_COPY),
    _P + "x__to_rgb__mutmut_123": ('return img if img.mode == "rgb" else img.convert("RGB")', _RGB_COPY),
    _P + "xǁPreprocessingǁgeometry__mutmut_6": ("elif width < height:  # shorter side to `short` (torchvision's "
                                                "Resize(int) rounding)", _SQUARE),
    _P + "xǁPreprocessingǁgeometry__mutmut_12": ("new_w, new_h = short, max(2, int(short * height / width))", _ONE_PX),
    _P + "xǁPreprocessingǁgeometry__mutmut_21": ("new_w, new_h = max(2, int(short * width / height)), short", _ONE_PX),
    _P + "xǁPreprocessingǁnormalize__mutmut_10": ("mean = torch.tensor(self.mean, device=None).view(-1, 1, 1) * 255.0", _CPU),
    _P + "xǁPreprocessingǁnormalize__mutmut_12": ("mean = torch.tensor(self.mean, ).view(-1, 1, 1) * 255.0", _CPU),
    _P + "xǁPreprocessingǁnormalize__mutmut_27": ("std = torch.tensor(self.std, device=None).view(-1, 1, 1) * 255.0", _CPU),
    _P + "xǁPreprocessingǁnormalize__mutmut_29": ("std = torch.tensor(self.std, ).view(-1, 1, 1) * 255.0", _CPU),
    _P + "xǁPreprocessingǁto_uint8__mutmut_3": ("arr = np.asarray(self.resize_crop(img), dtype=None)  # (S, S, 3)", _DTYPE),
    _P + "xǁPreprocessingǁto_uint8__mutmut_5": ("arr = np.asarray(self.resize_crop(img), )  # (S, S, 3)", _DTYPE),
    **{_Q + f"x__openvino_runner__mutmut_{n}": (f"request = compile_for_cpu({args}).create_infer_request()", why)
       for n, args, why in [(3, "model, None, threads", _HINT), (4, 'model, "int8", None', _THREADS),
                            (6, "model, threads", _HINT + "; " + _THREADS), (7, 'model, "int8", ', _THREADS),
                            (8, 'model, "XXint8XX", threads', _HINT), (9, 'model, "INT8", threads', _HINT)]},
    _Q + "x_build_int8__mutmut_34": ("(removed) subset_size=len(calibration),",
                                     "NNCF's default subset_size is 300, CALIBRATION_IMAGES, and the list holds at most "
                                     "CALIBRATION_IMAGES images: every one is used either way"),
    **{_Q + name: (line, why) for name, line, why in [
        ("x_build_int8__mutmut_88", "ov.save_model(int8, str(out), compress_to_fp16=None)", _FP16),
        ("x_build_int8__mutmut_91", "ov.save_model(int8, str(out), )", _FP16),
        ("x_build_int8__mutmut_93", "ov.save_model(int8, str(out), compress_to_fp16=True)", _FP16),
        ("x_build_int8__mutmut_38", "ignored_scope=nncf.IgnoredScope(patterns=kept_in_float, validate=None))",
         _VALIDATE),
        ("x_build_int8__mutmut_40", "ignored_scope=nncf.IgnoredScope(patterns=kept_in_float, ))", _VALIDATE),
        ("x_build_int8__mutmut_41", "ignored_scope=nncf.IgnoredScope(patterns=kept_in_float, validate=True))",
         _VALIDATE),
        ("x_image_logits__mutmut_28", "return np.concatenate(logits), np.asarray(labels, None)", _INT64),
        ("x_image_logits__mutmut_30", "return np.concatenate(logits), np.asarray(labels, )", _INT64),
        ("x_measure_agreement__mutmut_18", "p32 = model(pixels).float().softmax(+1).numpy()", _LOGITS_2D),
        ("x_measure_agreement__mutmut_24", "p8 = torch.from_numpy(int8(pixels)).float().softmax(+1).numpy()",
         _LOGITS_2D),
    ]},
    # vit_service/model.py
    _M + "xǁAttentionǁforward__mutmut_42": ("attn = ((q * self.scale) @ k.transpose(+2, -1)).softmax(dim=-1)  # (B, h, N, N)",
                                           "k is 4-D (B, h, N, d): dimension 2 is dimension -2"),
    **{_M + f"x_resample_pos_embed__mutmut_{n}": (line, "align_corners=None means False for bicubic (torch's default)")
       for n, line in [(42, 'grid = F.interpolate(grid, size=new_grid, mode="bicubic", antialias=True, align_corners=None)'),
                       (47, 'grid = F.interpolate(grid, size=new_grid, mode="bicubic", antialias=True, )')]},
    _M + "xǁVisionTransformerǁ_pos_embed__mutmut_23": (
        "x = torch.cat([self.cls_token.expand(x.shape[0], +1, -1), x], dim=1)  # (B, N, D)",
        "expand keeps a size-1 dimension at 1 whether given -1 (keep) or 1"),
    **{_M + f"xǁVisionTransformerǁforward_features__mutmut_{n}": (line, _REENTRANT)
       for n, line in [(7, "x = checkpoint(blk, x, use_reentrant=None)"), (10, "x = checkpoint(blk, x, )"),
                       (11, "x = checkpoint(blk, x, use_reentrant=True)")]},
    _M + "xǁDropPathǁforward__mutmut_3": ("if self.p == 1.0 or not self.training:",
                                         "at p = 0 the mask path keeps every sample (keep = 1): x either way; "
                                         "p = 1 is never configured (drop_path_rate < 1)"),
    _M + "xǁLayerScaleǁ__init____mutmut_3": ("self.gamma = nn.Parameter(init_values / torch.ones(dim))",
                                            "v / 1 is v * 1"),
    _M + "xǁVisionTransformerǁ_embed__mutmut_9": (
        "return self._pos_embed(tokens, (x.shape[+2] // P, x.shape[-1] // P))  # (B, N, D)",
        "x is 4-D here (PatchEmbed refused anything else): dimension 2 is dimension -2"),
    # vit_service/explain.py
    **{_X + name: (line, why) for name, line, why in [
        ("x__discard_weakest__mutmut_11", "eye = torch.eye(N, dtype=torch.bool, device=None)", _CPU),
        ("x__discard_weakest__mutmut_14", "eye = torch.eye(N, dtype=torch.bool, )", _CPU),
        ("x__discard_weakest__mutmut_23",
         'flat = a.masked_fill(eye, float("INF")).flatten(1)  # (B, N*N); the diagonal is never lowest',
         'float("INF") is float("inf")'),
        ("x__discard_weakest__mutmut_30", "lowest = flat.topk(k, largest=False).indices  # (B, k)",
         _TOPK_DIM),
        ("x__discard_weakest__mutmut_32", "lowest = flat.topk(k, dim=+1, largest=False).indices  # (B, k)",
         "flat is 2-D: dimension 1 is dimension -1"),
        ("x_attention_rollout__mutmut_16",
         "eye = torch.eye(N, dtype=None, device=attentions[0].device)",
         _F32),
        ("x_attention_rollout__mutmut_17",
         "eye = torch.eye(N, dtype=torch.float32, device=None)", _CPU),
        ("x_attention_rollout__mutmut_19",
         "eye = torch.eye(N, device=attentions[0].device)", _F32),
        ("x_attention_rollout__mutmut_20",
         "eye = torch.eye(N, dtype=torch.float32, )", _CPU),
        ("x_gradient_rollout__mutmut_7", "eye = torch.eye(N, dtype=None, device=attentions[0].device)", _F32),
        ("x_gradient_rollout__mutmut_8", "eye = torch.eye(N, dtype=torch.float32, device=None)", _CPU),
        ("x_gradient_rollout__mutmut_10", "eye = torch.eye(N, device=attentions[0].device)", _F32),
        ("x_gradient_rollout__mutmut_11", "eye = torch.eye(N, dtype=torch.float32, )", _CPU),
        ("xǁExplainerǁ__init____mutmut_4", "self.device = None", _CPU),
        ("xǁExplainerǁ__init____mutmut_11", "self.model = model.to(None).eval()", _CPU),
        ("xǁExplainerǁexplain_uint8__mutmut_7", "x = torch.as_tensor(np.asarray(pixels)).to(None)", _CPU),
        ("x_gradient_rollout__mutmut_17", "relevance = eye.expand(N, N)",
         "an (N, N) identity broadcasts over the batch in `relevance + a @ relevance`: the same (B, N, N) after it"),
        ("x_attention_rollout__mutmut_26", "rollout = eye.expand(N, N)",
         "an (N, N) identity broadcasts over the batch in `a @ rollout`: the same (B, N, N) after the first block"),
        ("x_explain_batch__mutmut_14", "grid = (x.shape[+2] // P, x.shape[-1] // P)",
         "x is 4-D (B, C, H, W) (the model refuses anything else): dimension 2 is dimension -2"),
        *[(f"x_explain_batch__mutmut_{n}", "target = logits.argmax(+1) if class_index is None else "
           "torch.full_like(logits[:, 0], class_index, dtype=torch.long)", _LOGITS_2D) for n in (30, 57)],
        ("x_explain_batch__mutmut_92", "probs = (logits.detach().float() / temperature).softmax(dim=+1)", _LOGITS_2D),
    ]},
    # vit_service/serving/errors.py and auth.py
    **{_E + name: (line, why) for name, line, why in [
        ("x_shaped_message__mutmut_7", 'text = body.decode("UTF-8", "replace").strip()', _CODEC),
        ("x_shaped_message__mutmut_20", 'data = ""', "None and \"\" are both not a dict: the same branch follows"),
        ("xǁErrorShapeMiddlewareǁ__call____mutmut_14", "forwarded = None  # whether anything of the answer went out yet",
         _FALSY),
        ("xǁErrorShapeMiddlewareǁ__call____mutmut_43", 'if message.get("more_body", None):', _FALSY),
        ("xǁErrorShapeMiddlewareǁ__call____mutmut_45", 'if message.get("more_body", ):', _FALSY),
        ("xǁErrorShapeMiddlewareǁ_send_shaped__mutmut_13",
         'headers = {k.decode("LATIN-1").lower(): v.decode("latin-1") for k, v in raw_headers}', _CODEC),
        ("xǁErrorShapeMiddlewareǁ_send_shaped__mutmut_16",
         'headers = {k.decode("latin-1").lower(): v.decode("LATIN-1") for k, v in raw_headers}', _CODEC),
        ("xǁErrorShapeMiddlewareǁ_send_shaped__mutmut_36",
         'message = shaped_message(start["status"], headers.get("content-type", "XXXX"), body, scope, headers.get("allow"))',
         'no content type and "XXXX" are both neither JSON nor text/plain: the same branch'),
    ]},
    **{_A + name: (line, why) for name, line, why in [
        ("x_read_key_file__mutmut_3", "lines = Path(raw).read_text(encoding=None).splitlines()",
         "Python reads files as UTF-8 under a UTF-8 or the C locale (PEP 538 coerces C to C.UTF-8): "
         "only a host with a non-UTF-8 locale could tell"),
        ("x_read_key_file__mutmut_6", 'lines = Path(raw).read_text(encoding="UTF-8").splitlines()', _CODEC),
        ("xǁAuthMiddlewareǁ__call____mutmut_18", 'authorization = ""', "check() answers None and \"\" alike: missing"),
        ("xǁAuthMiddlewareǁ__call____mutmut_32", 'authorization = value.decode("LATIN-1")', _CODEC),
        ("xǁAuthMiddlewareǁ__init____mutmut_5", "self.on_failure = on_failure or (lambda reason: 0)",
         "the callback's return value is never used"),
    ]},
    # vit_service/backends/*.py
    **{"vit_service.backends.decision." + name: (line, why) for name, line, why in [
        *[(f"x_race__mutmut_{n}", line, "race's first value of `reason` is never read: a candidate that wins sets it, "
           "and with none winning the last branch does") for n, line in [(7, "reason = None"), (8, 'reason = "XXXX"')]],
        *[(f"x_kept_or_measured__mutmut_{n}",
           f"digest = hashlib.sha256(json.dumps(key, {args}).encode()).hexdigest()[:20]",
           "decision_key builds the key's dict in one fixed order (and its runtimes from REGISTRY's), so the file "
           "name is the same with or without sorting; the kept key itself is compared as a dict")
          for n, args in [(6, "sort_keys=None"), (8, ""), (9, "sort_keys=False")]],
        *[(f"x_kept_or_measured__mutmut_{n}", f"tmp.write_text(json.dumps(decision.to_dict(), {args}))",
           "only the kept file's whitespace changes: json.loads reads the same decision")
          for n, args in [(54, "indent=None"), (56, ""), (57, "indent=2")]],
    ]},
    **{"vit_service.backends.base.xǁPredictorǁwarmup__mutmut_" + n: (line, _CPU + " (the CUDA synchronisation)")
       for n, line in [("12", 'if self.device.type == "XXcudaXX":'), ("13", 'if self.device.type == "CUDA":'),
                       ("14", "torch.cuda.synchronize(None)")]},
    **{"vit_service.backends.openvino_runtime.xǁOpenVINORuntimeǁforward__mutmut_" + n: (
        f"self.request.infer({{0: pixels.numpy()}}, {args})",
        "share_inputs only spares OpenVINO a copy of the input batch: the same outputs (a speed choice)")
       for n, args in [("2", "share_inputs=None"), ("4", ""), ("6", "share_inputs=False")]},
    **{"vit_service.backends.openvino_runtime.x_convert__mutmut_" + n: (line, why) for n, line, why in [
        ("16", "return ov.convert_model(model.eval(), example_input=torch.zeros(3, 3, S, S),",
         "the example input only traces the network; the batch axis is dynamic either way"),
        ("4", "input=None)", "without `input` ov.convert_model leaves every axis dynamic: the same outputs at the "
         "one image size served (checked at batch 12 against torch)"),
        ("7", ")", "without `input` ov.convert_model leaves every axis dynamic: the same outputs at the one image "
         "size served (checked at batch 12 against torch)"),
    ]},
    "vit_service.backends.base.x__writable__mutmut_1": (
        "return a if (a.flags.writeable) and False else np.array(a)",
        "a copy of a writable array holds the same values: only the copy's cost differs"),
    **{f"vit_service.backends.openvino_runtime.xǁOpenVINORuntimeǁ__init____mutmut_{n}": (
        f'def __init__(self, source: ModelSource, precision: str = "{value}", threads: int | None = None,',
        "load_backend always passes the precision: the default is never used") for n, value in [(1, "XXfp32XX"), (2, "FP32")]},
    **{f"vit_service.backends.torch_runtime.x_resolve_device__mutmut_{n}": (
        f'def resolve_device(name: str = "{value}") -> torch.device:',
        "every caller (load_backend, vit-explain, bench/serve_load.py) passes the device: the default is never used")
       for n, value in [(1, "XXautoXX"), (2, "AUTO")]},
    **{f"vit_service.backends.torch_runtime.x_resolve_device__mutmut_{n}": (
        f'return torch.device({line} else "cpu")', "no CUDA here: `auto` is the CPU either way; only a GPU run can tell")
       for n, line in [(7, '"cuda" if (torch.cuda.is_available()) and False'), (9, '"XXcudaXX" if torch.cuda.is_available()'),
                       (10, '"CUDA" if torch.cuda.is_available()')]},
    **{f"vit_service.backends.x_check_servable__mutmut_{n}": (
        f'def check_servable(directory: str | os.PathLike[str], backend: str = "auto", precision: str = "{value}") '
        "-> None:", "check_servable reads the precision only to tell int8 apart: any other default is the same")
       for n, value in [(3, "XXautoXX"), (4, "AUTO")]},
    "vit_service.backends.base.xǁPredictorǁ__init____mutmut_21": (
        'self.decision: dict[str, Any] | None = ""  # how the runtime was chosen (decision.py), for /model_info',
        "every reader asks whether there is a decision by its truth (describe, bench/serve_load.py): \"\" reads "
        "as None"),
    "vit_service.backends.x_runtime_class__mutmut_3": (
        'module, _, cls = REGISTRY[name][0].rpartition(":")',
        'every REGISTRY entry has one ":" (module:Class): split at the first or the last, the same parts'),
    **{f"vit_service.backends.x_load_backend__mutmut_{n}": (
        f"return race({{c: Predictor(source, r, {arg}).predict_proba for c, r in built.items()}}, x)",
        "the race only times the candidates: dividing the logits by T costs the same whether it is applied "
        "or not; the Predictor that serves is built with `calibrated` (test_raw_setting_serves_the_plain_softmax)")
       for n, arg in [(80, "None"), (83, "")]},
    "vit_service.backends.openvino_runtime.x_network__mutmut_40": (
        "ov.save_model(model, str(tmp), compress_to_fp16=None)",
        "OpenVINO's bool argument takes None as False: the weights stay fp32 (checked: the same .bin size, half "
        "with True)"),
    "vit_service.backends.openvino_runtime.x_compile_for_cpu__mutmut_7": (
        'hint = HINTS.get(precision) or ("BF16" if cpu_can_accelerate_bf16(read_cpu()) else "f32")',
        "OpenVINO reads element type names in any case: a model compiled with BF16 reports bf16 (checked)"),
    **{"vit_service.backends.torch_runtime.xǁTorchRuntimeǁ__init____mutmut_" + n: (line, why) for n, line, why in [
        ("1", 'def __init__(self, source: ModelSource, precision: str = "XXautoXX", threads: int | None = None,',
         "load_backend always passes the precision: the default is never used"),
        ("2", 'def __init__(self, source: ModelSource, precision: str = "AUTO", threads: int | None = None,',
         "load_backend always passes the precision: the default is never used"),
        ("22", "torch.backends.cuda.matmul.allow_tf32 = False", _CPU + " (TF32 matmuls)"),
    ]},
    # training/module.py
    **{f"training.module.x__accuracy_metrics__mutmut_{n}": (line, why) for n, line, why in [
        (7, '{"acc1": MulticlassAccuracy(None, top_k=1, average="micro"),',
         "a micro average counts right answers over all images: it needs no class count (torchmetrics' default None)"),
        (10, '{"acc1": MulticlassAccuracy(top_k=1, average="micro"),',
         "a micro average counts right answers over all images: it needs no class count (torchmetrics' default None)"),
        (11, '{"acc1": MulticlassAccuracy(num_classes, average="micro"),', "torchmetrics' default top_k is 1"),
        (37, '"balanced_acc1": MulticlassAccuracy(num_classes, average="macro")},', "torchmetrics' default top_k is 1"),
        (38, '"balanced_acc1": MulticlassAccuracy(num_classes, top_k=1, )},', "torchmetrics' default average is macro"),
    ]},
    **{"training.module.xǁViTClassifierǁ" + name: (line, why) for name, line, why in [
        ("predict_step__mutmut_8", "probs = self(x).softmax(dim=+1)", _LOGITS_2D),
        ("predict_step__mutmut_14", "scores, indices = probs.topk(min(5, probs.shape[-1]), )", _TOPK_DIM),
        ("predict_step__mutmut_20", "scores, indices = probs.topk(min(5, probs.shape[+1]), dim=-1)", _LOGITS_2D),
        ("predict_step__mutmut_22", "scores, indices = probs.topk(min(5, probs.shape[-1]), dim=+1)", _LOGITS_2D),
        ("on_save_checkpoint__mutmut_10",
         '"train_time_s": round(timer.time_elapsed(), 1) if (timer) or True else None,',
         "configure_callbacks gives every run a Timer (or its TimeBudget): `timer` is never None in a fit"),
        ("on_train_epoch_end__mutmut_6", 'dm = getattr(self.trainer, "datamodule", )',
         "a Trainer always has a `datamodule` attribute (None without one): the default is never used"),
        *[(f"on_train_epoch_end__mutmut_{n}", f'self.log("data/skipped_files", float(dm.num_skipped_files()), {args})',
           "rank_zero_only only matters with several processes, whose logger writes on rank 0 either way "
           "(test_ddp.py's ranks are subprocesses mutmut does not follow)") for n, args in [(19, "rank_zero_only=None"),
                                                                                           (22, ""),
                                                                                           (26, "rank_zero_only=False")]],
        ("configure_optimizers__mutmut_39", "optimizer = torch.optim.AdamW(groups, betas=tuple(hp.betas))",
         "every parameter group carries its own lr (set just above): AdamW's default lr is never used"),
        ("configure_optimizers__mutmut_58", "steps_per_epoch = total_steps / max(1, self.trainer.max_epochs or 2)",
         "Lightning's max_epochs is never None (1000 by default, -1 with max_steps); at 0 nothing trains and "
         "warmup_steps is min(..., total_steps - 1) = 0 either way"),
        ("on_validation_epoch_end__mutmut_4", 'if self.trainer.state.fn == "FIT" and not self.trainer.sanity_checking:',
         "Lightning's TrainerFn compares strings case-insensitively (LightningEnum): \"FIT\" is \"fit\" (checked)"),
        *[(f"on_validation_epoch_end__mutmut_{n}",
           f'self.log("time/elapsed_min", self._timer().time_elapsed() / 60, {args})',
           "rank_zero_only only matters with several processes, whose logger writes on rank 0 either way "
           "(test_ddp.py's ranks are subprocesses mutmut does not follow)") for n, args in [(8, "rank_zero_only=None"),
                                                                                           (11, "")]],
        ("_step__mutmut_44", "on_step = None",
         "Lightning's defaults where on_step is None: per step in training_step, per epoch elsewhere, as set; "
         "sync_dist=not None then syncs the training step's loss, which only matters with several processes"),
        *[(f"_step__mutmut_{n}", f'self.log(f"{{split}}/images", float(len(y)), {args}', why) for n, args, why in [
            (53, 'on_step=None, on_epoch=True, reduce_fx="sum", sync_dist=True,',
             "on_step's default outside training_step is False, as set"),
            (60, 'on_epoch=True, reduce_fx="sum", sync_dist=True,', "on_step's default outside training_step is False, as set"),
            (54, 'on_step=False, on_epoch=None, reduce_fx="sum", sync_dist=True,',
             "on_epoch's default outside training_step is True, as set"),
            (61, 'on_step=False, reduce_fx="sum", sync_dist=True,', "on_epoch's default outside training_step is True, as set"),
            (56, 'on_step=False, on_epoch=True, reduce_fx="sum", sync_dist=None,', _SYNC),
            (63, 'on_step=False, on_epoch=True, reduce_fx="sum", batch_size=len(y))', _SYNC),
            (69, 'on_step=False, on_epoch=True, reduce_fx="SUM", sync_dist=True,',
             "Lightning lower-cases reduce_fx before it reads it"),
        ]],
        *[(f"_step__mutmut_{n}", line, "a sum is not weighted by batch size (only a mean is); Lightning's own guess "
           "from the batch is len(y) anyway") for n, line in [(57, "batch_size=None)"), (64, ")")]],
        *[(f"_step__mutmut_{n}", f'self.log(f"{{split}}/{what}", {args}', _SYNC) for n, what, args in [
            (70, "images", 'float(len(y)), on_step=False, on_epoch=True, reduce_fx="sum", sync_dist=False,'),
            (76, "loss", "loss, prog_bar=True, on_step=on_step, on_epoch=True, sync_dist=None)"),
            (82, "loss", "loss, prog_bar=True, on_step=on_step, on_epoch=True, )"),
            (85, "loss", "loss, prog_bar=True, on_step=on_step, on_epoch=True, sync_dist=on_step)"),
        ]],
        *[(f"_step__mutmut_{n}", f'self.log(f"{{split}}/loss", loss, prog_bar=True, {args}',
           "Lightning's default where on_step is None or left out: per step in training_step, not elsewhere: as set")
          for n, args in [(74, "on_step=None, on_epoch=True, sync_dist=not on_step)"),
                          (80, "on_epoch=True, sync_dist=not on_step)")]],
        *[(f"configure_callbacks__mutmut_{n}", f"return [] if self._timer() else [Timer(verbose={v})]",
           "a Timer prints only when its duration is reached, and this one has none") for n, v in [(3, "None"),
                                                                                                 (4, "True")]],
        ("on_validation_epoch_end__mutmut_16",
         'self.log("time/elapsed_min", self._timer().time_elapsed() / 60, rank_zero_only=False)', _SYNC),
        ("lr_scheduler_step__mutmut_3", "super().lr_scheduler_step(scheduler, None)",
         "Lightning passes metric=None to a schedule that is not ReduceLROnPlateau, and LambdaLR.step takes none: "
         "the same call"),
    ]},
    # training/data.py
    **{"training.data.xǁImageFolderDataModuleǁ" + name: (line, why) for name, line, why in [
        *[(f"_loader__mutmut_{n}", line, _NO_PINNING) for n, line in [
            (4, "pin_memory=None, drop_last=shuffle,"), (9, "drop_last=shuffle,"), (27, "num_workers=self.num_workers, pin_memory=None,"),
            (34, "num_workers=self.num_workers, persistent_workers=self.num_workers > 0, drop_last=shuffle,  # Mixup needs even, "
                 "full batches")]],
        ("_loader__mutmut_20", "drop_last=shuffle)", "DataLoader's default num_workers is 0"),
        *[(f"setup__mutmut_{n}", f"train = ImageFolderDataset(hp.train_dir, self.train_transform(), {arg})", _OWN_CLASSES)
          for n, arg in [(34, "None"), (37, "")]],
        *[(f"setup__mutmut_{n}", f'if stage == "validate" and "{key}" not in self.datasets:',
           "the fit set-up it then calls again does nothing once the training set exists (its own guard): the same "
           "datasets") for n, key in [(110, "XXvalXX"), (111, "VAL")]],
        ("on_after_batch_transfer__mutmut_11", "batch = [self.batch_augment.to(None)(images), labels]",
         "the batch and the augmentation are on the CPU here, where .to(None) moves nothing: only a GPU run can tell"),
    ]},
    # vit_service/artifact.py
    **{_R + name: (line, why) for name, line, why in [
        ("x_save_safetensors__mutmut_14", "umask = os.umask(1)",
         "os.umask returns the mask it replaces and the next line puts that back: the value set between is never used"),
        ("xǁModelArtifactǁsave__mutmut_10",
         "state = {k: v.detach().to(None).contiguous() for k, v in model.state_dict().items()}", _CPU),
        ("x_load_model__mutmut_22", "return model.float().to(None).eval(), artifact  # float(): fp32 as built, "
         "whatever the file held", _CPU),
        ("x_load_model__mutmut_14", "model.load_state_dict(load_file(str(Path(directory) / WEIGHTS_FILE)), assign=True)",
         "load_state_dict's default is strict=True"),
        *[(f"xǁModelArtifactǁsave__mutmut_{n}", f"(directory / MANIFEST_FILE).write_text(json.dumps(self.to_dict(), "
           f"{args}))", "only the manifest's whitespace changes: every JSON reader gets the same object")
          for n, args in [(21, "indent=None, default=str"), (24, "default=str"), (26, "indent=3, default=str")]],
    ]},
    # training/callbacks/*.py
    **{"training.callbacks.progressive_resize.xǁProgressiveResizeǁon_train_batch_start__mutmut_" + n: (line, why)
       for n, line, why in [
        ("22", "align_corners=None)  # (B, C, size, size)", "align_corners=None means False for bilinear"),
        ("27", ")  # (B, C, size, size)", "align_corners defaults to None, which means False for bilinear"),
        ("11", "if size is None or batch[0].shape[-2] == size:",
         "the batch's images are square (the data module's crops): height is width"),
    ]},
    **{"training.callbacks.time_budget.xǁTimeBudgetǁ" + name: (line, _TIMER_ARGS) for name, line in [
        ("on_train_start__mutmut_1", "super().on_train_start(None, pl_module)"),
        ("on_train_start__mutmut_2", "super().on_train_start(trainer, None)"),
        ("on_train_batch_end__mutmut_3",
         "super().on_train_batch_end(trainer, None, outputs, batch, batch_idx)  # Timer: stop when spent"),
        ("on_train_batch_end__mutmut_4",
         "super().on_train_batch_end(trainer, pl_module, None, batch, batch_idx)  # Timer: stop when spent"),
        ("on_train_batch_end__mutmut_5",
         "super().on_train_batch_end(trainer, pl_module, outputs, None, batch_idx)  # Timer: stop when spent"),
        ("on_train_batch_end__mutmut_6",
         "super().on_train_batch_end(trainer, pl_module, outputs, batch, None)  # Timer: stop when spent"),
        ("on_train_batch_end__mutmut_8",
         "super().on_train_batch_end(trainer, outputs, batch, batch_idx)  # Timer: stop when spent"),
        ("__init____mutmut_16", 'super().__init__(duration=budget, interval="step", verbose=None)'),
        ("__init____mutmut_18", "super().__init__(duration=budget, verbose=False)"),
        ("on_train_batch_end__mutmut_9",
         "super().on_train_batch_end(trainer, pl_module, batch, batch_idx)  # Timer: stop when spent"),
        ("on_train_batch_end__mutmut_10",
         "super().on_train_batch_end(trainer, pl_module, outputs, batch_idx)  # Timer: stop when spent"),
        ("on_train_batch_end__mutmut_11",
         "super().on_train_batch_end(trainer, pl_module, outputs, batch, )  # Timer: stop when spent"),
    ]},
    "training.callbacks.time_budget.x_training_progress__mutmut_10": (
        "return min(2.0, trainer.global_step / total)",
        "at every batch start global_step < total (Lightning stops at its estimated steps): the cap never binds"),
    "training.callbacks.time_budget.x_training_progress__mutmut_2": (
        "if not total and math.isinf(total):",
        "an infinite total gives step / inf = 0.0 either way; a total of 0 means no batch runs, so nothing asks"),
    **{"training.callbacks.time_budget.xǁTimeBudgetǁon_train_batch_start__mutmut_" + n: (
        f'warnings.filterwarnings("ignore", message=r"{text}")',
        "warnings.filterwarnings matches its message case-insensitively (re.I): the same filter")
       for n, text in [("10", r"detected call of `lr_scheduler.step\(\)` before"),
                       ("11", r"DETECTED CALL OF `LR_SCHEDULER.STEP\(\)` BEFORE")]},
    "training.callbacks.time_budget.xǁTimeBudgetǁon_train_batch_start__mutmut_6": (
        'warnings.filterwarnings("ignore", )',
        "only the schedule's step runs inside the filter, and the warning it gives is the one meant"),
    # training/export.py
    **{"training.export.x_main__mutmut_" + n: (line, _SCRATCH) for n, line in [
        ("76", 'with tempfile.TemporaryDirectory(prefix=None) as scratch:'),
        ("77", 'with tempfile.TemporaryDirectory(prefix="XXvit-export-XX") as scratch:'),
        ("78", 'with tempfile.TemporaryDirectory(prefix="VIT-EXPORT-") as scratch:'),
        ("137", 'extra = [export_onnx(model, Path(scratch) / "XXonnxXX")] if args.onnx else []'),
        ("138", 'extra = [export_onnx(model, Path(scratch) / "ONNX")] if args.onnx else []'),
        ("142", 'int8_dir = Path(scratch) / "XXint8XX"'),
        ("143", 'int8_dir = Path(scratch) / "INT8"')]},
    "training.export.x_main__mutmut_114": ('artifact.int8 = artifact.calibration = artifact.reference = ""',
                                           "None and \"\" are both false where the records are read (to_dict, "
                                           "temperature) and each is set anew when made"),
    "training.export.x_main__mutmut_174": (
        "copy_extra = (lambda folder: [shutil.copy(f, folder / f.name) for f in extra]) if (extra) or True else None",
        "with no extra files the copy copies nothing: the same files either way"),
    "training.export.x_main__mutmut_37": ('p.add_argument("--name", default="VIT-CLASSIFIER", help="BentoML model '
                                          'name (default: vit-classifier)")',
                                          "BentoML lowercases model names (logging that it did): the same tag"),
    **{"training.export.x__int8_calibration__mutmut_" + n: (line, "the record's bins are calibration.BINS, "
                                                                   "ece's default")
       for n, line in [("32", 'artifact.calibration["int8"] = {"ece_before": round(ece(softmax(logits), labels, ), 6),'),
                       ("46", '"ece_after": round(ece(softmax(logits, t), labels, ), 6)}')]},
    # vit_service/calibration.py
    **{_C + f"x_fit_temperature__mutmut_{n}": (line, _OPTIMIZER) for n, line in [
        (1, "max_iter: int = 101) -> float:"),
        (25, 'optimizer = torch.optim.LBFGS([log_t], max_iter=max_iter, line_search_fn="strong_wolfe")'),
        (26, 'optimizer = torch.optim.LBFGS([log_t], lr=0.5, line_search_fn="strong_wolfe")'),
        (28, 'optimizer = torch.optim.LBFGS([log_t], lr=1.5, max_iter=max_iter, line_search_fn="strong_wolfe")')]},
    _C + "x_reference_record__mutmut_13": ('which = np.clip(np.searchsorted(SCORE_EDGES, top1, side="right") - 1, None, '
                                           'len(SCORE_EDGES) - 2)', "a top-1 score is at least 1/K > 0: index >= 0"),
    _C + "x_reliability__mutmut_9": ("which = np.clip(np.ceil(confidence * bins).astype(np.int64) - 1, 0, None)",
                                     _AT_MOST_1),
    _C + "x_reliability__mutmut_19": ("which = np.clip(np.ceil(confidence * bins).astype(np.int64) - 1, 0, bins + 1)",
                                      _AT_MOST_1),
    _C + "x_reliability__mutmut_35": ("accuracy = np.bincount(which, weights=np.asarray(correct, None), minlength=bins) "
                                      "/ np.maximum(1, counts)", _WEIGHTS),
    _C + "x_reliability__mutmut_37": ("accuracy = np.bincount(which, weights=np.asarray(correct, ), minlength=bins) "
                                      "/ np.maximum(1, counts)", _WEIGHTS),
    _C + "x_served_calibration__mutmut_1": ('def served_calibration(record: dict[str, Any] | None, calibrated: bool, '
                                            'precision: str = "XXfp32XX") -> dict[str, Any]:', _NOT_INT8),
    _C + "x_served_calibration__mutmut_2": ('def served_calibration(record: dict[str, Any] | None, calibrated: bool, '
                                            'precision: str = "FP32") -> dict[str, Any]:', _NOT_INT8),
}


def present(module: str) -> list[str]:
    return sorted(glob.glob(module, root_dir=REPO))


def slug(module: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", module.removesuffix(".py")).strip("_")


def workdir(module: str) -> Path:
    """.mutation/<slug>/: links to the repository's code and tests, and a pyproject.toml that is
    the repository's plus this module's [tool.mutmut] (mutmut reads it from the folder it runs in)."""
    folder = WORK / slug(module)
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("vit_service", "training", "tests", "bench", "configs", "docs", "scripts", "Makefile", "README.md"):
        link = folder / name
        if not link.is_symlink():
            link.symlink_to(os.path.relpath(REPO / name, folder))
    tests = [a for a in MODULES[module] if a.startswith("tests/")]
    others = [a for a in MODULES[module] if not a.startswith("tests/")]
    config = (REPO / "pyproject.toml").read_text() + "\n# generated by scripts/mutation.py\n[tool.mutmut]\n" + "\n".join([
        'source_paths = ["vit_service", "training"]',
        f"only_mutate = {toml_list([module])}",
        f"pytest_add_cli_args_test_selection = {toml_list(tests + others)}",
        f"pytest_add_cli_args = {toml_list([*FAST, '-p', 'no:cacheprovider', '-p', 'no:xdist'])}",
        f"also_copy = {toml_list(['bench', 'configs', 'docs', 'scripts', 'Makefile', 'README.md'])}",
        "use_setproctitle = false",  # (mutmut's title for each worker; nothing here needs it)
        'process_isolation = "forkserver"',  # workers forked before torch starts its threads
        # A mutant is a timeout past (tests' recorded seconds + 10) x 4 of wall time (mutmut's default x 15
        # let a mutant that blocks on the decision's lock hold a worker ~4 min); the 10 s cover fixtures,
        # whose set-up time mutmut does not record.
        "timeout_multiplier = 4.0",
        "timeout_constant = 10.0",
    ]) + "\n"
    path = folder / "pyproject.toml"
    if not path.exists() or path.read_text() != config:
        path.write_text(config)
    return folder


def toml_list(items: list[str]) -> str:
    return "[" + ", ".join('"' + i.replace("\\", "\\\\").replace('"', '\\"') + '"' for i in items) + "]"


def env(module: str) -> dict[str, str]:
    """mutmut's tests import the mutated copy: nothing else of the project on PYTHONPATH. BentoML's home is
    the module's folder: a mutant may save a model where the code would have refused, never into the user's."""
    kept = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MUTANT_UNDER_TEST")}
    return {**kept, "BENTOML_HOME": str(WORK / slug(module) / "bentoml")}


def run(module: str, jobs: int, budget_s: float | None, names: list[str]) -> int:
    """`mutmut run` in the module's folder (its output in run.log there, a progress line a minute
    here); `names`: only those mutants, run again even if they have a result."""
    folder = workdir(module)
    if names:
        # mutmut keeps which tests reach each function from its first run; tests added since would be
        # left out of these mutants' runs (seen): trace them again
        (folder / "mutants" / "mutmut-stats.json").unlink(missing_ok=True)
    # the session fixtures shared by every mutant's run (tests/conftest.py's built_once): built afresh
    shutil.rmtree(folder / "mutants" / ".built", ignore_errors=True)
    log = folder / "run.log"
    print(f"==> {module}: mutmut run in {folder.relative_to(REPO)} ({jobs} worker(s)), output in {log.relative_to(REPO)}",
          flush=True)
    start = time.monotonic()
    stopped = False
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(MUTMUT), "run", "--max-children", str(jobs), *names], cwd=folder, env=env(module),
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        while proc.poll() is None:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                print(f"    {time.monotonic() - start:4.0f} s  {progress(log)}", flush=True)
                if budget_s is not None and time.monotonic() - start > budget_s:
                    _stop(proc)
                    stopped = True
                    print(f"==> {module}: stopped after the {budget_s:.0f} s budget; run again to continue")
    print(f"==> {module}: {time.monotonic() - start:.0f} s, exit {proc.returncode}; {progress(log)}", flush=True)
    if stopped:
        return 0  # the budget's stop, not a failure
    if proc.returncode != 0:
        print(log.read_text(errors="replace")[-3000:])
    return proc.returncode


def _stop(proc: subprocess.Popen) -> None:
    """Stops a mutmut run: SIGINT first (it records what it has), then its whole process group, since
    with the forkserver its forked workers can go on past SIGINT (seen with mutmut 3.8). Every
    finished mutant's result is already on disk; only the ones in flight run again next time."""
    os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def progress(log: Path) -> str:
    """mutmut's last progress line: done/total, then killed, no tests, timeout, suspicious, survived."""
    found = re.findall(r"(\d+/\d+)\s+🎉 (\d+) 🫥 (\d+)\s+⏰ (\d+)\s+🤔 (\d+)\s+🙁 (\d+)",
                       log.read_text(errors="replace")[-4000:])
    if not found:
        return "(starting)"
    done, killed, no_tests, timeout, suspicious, survived = found[-1]
    return f"{done} mutants: {killed} killed, {survived} survived, {no_tests} no tests, {timeout} timeout"


def results(module: str) -> dict[str, str]:
    """{mutant name: status} from mutmut's cache of the module's folder."""
    folder = WORK / slug(module)
    if not (folder / "mutants").is_dir():
        return {}
    out = subprocess.run([str(MUTMUT), "results", "--all", "true"], cwd=folder, env=env(module), capture_output=True,
                         text=True, check=True).stdout
    return dict(line.strip().rsplit(": ", 1) for line in out.splitlines() if ": " in line)


def mutated_line(module: str, name: str) -> str:
    """The first line `mutmut show` marks as added: what the mutant changed."""
    out = subprocess.run([str(MUTMUT), "show", name], cwd=WORK / slug(module), env=env(module), capture_output=True,
                         text=True).stdout
    added = [line[1:].strip() for line in out.splitlines() if line.startswith("+") and not line.startswith("+++")]
    removed = [line[1:].strip() for line in out.splitlines() if line.startswith("-") and not line.startswith("---")]
    return added[0] if added else f"(removed) {removed[0]}" if removed else "?"


def report(modules: list[str]) -> None:
    """The per-module table and the survivors, in markdown."""
    rows, survivors = [], []
    for module in modules:
        status = results(module)
        if not status:
            rows.append(f"| `{module}` | not run{'' if present(module) else ' (no such file yet)'} | | | | |")
            continue
        count = {s: sum(1 for v in status.values() if v == s) for s in set(status.values())}
        equivalent, stale = [], []
        for name in sorted(n for n, s in status.items() if s == "survived"):
            line = mutated_line(module, name)
            if name in EQUIVALENT and EQUIVALENT[name][0] == line:
                equivalent.append(name)
                survivors.append(f"- `{name}` (equivalent: {EQUIVALENT[name][1]}): `{line}`")
            else:
                stale += [name] if name in EQUIVALENT else []
                survivors.append(f"- `{name}`{' (listed equivalent, line changed)' if name in EQUIVALENT else ''}: "
                                 f"`{line}`")
        killed = count.get("killed", 0) + count.get("timeout", 0)
        # mutants an interrupted run has not reached yet ("not checked") are not scored: they are in "other"
        scored = len(status) - len(equivalent) - count.get("no tests", 0) - count.get("not checked", 0)
        other = len(status) - killed - count.get("survived", 0) - count.get("no tests", 0)
        rows.append(f"| `{module}` | {killed} / {scored} ({100 * killed / max(scored, 1):.1f}%) | "
                    f"{count.get('survived', 0) - len(equivalent)} | {len(equivalent)} | {count.get('no tests', 0)} | "
                    f"{other} |")
    print("| module | killed / scored | survived | equivalent | no test reaches it | other |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))
    if survivors:
        print("\nSurvivors:\n")
        print("\n".join(survivors))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["list", "run", "report"])
    parser.add_argument("modules", nargs="*", help="keys of MODULES (default: every module that exists)")
    parser.add_argument("--jobs", type=int, default=1, help="mutants tested at once (default 1)")
    parser.add_argument("--budget", type=float, default=None, help="seconds per module, then stop (resumable)")
    parser.add_argument("--survivors", action="store_true",
                        help="run the module's surviving mutants again, the listed equivalent ones left out (after adding tests)")
    parser.add_argument("--mutants", nargs="+", default=[], metavar="NAME",
                        help="run these mutants again (names or globs, as `report` lists them)")
    args = parser.parse_args(argv)
    unknown = [m for m in args.modules if m not in MODULES]
    if unknown:
        parser.error(f"not in MODULES: {', '.join(unknown)}; one of: {', '.join(MODULES)}")
    modules = args.modules or [m for m in MODULES if present(m)]
    if args.command == "list":
        for module in MODULES:
            print(f"{module:38} {'present' if present(module) else 'absent '}  {' '.join(MODULES[module])}")
        return 0
    if args.command == "report":
        report(args.modules or list(MODULES))
        return 0
    if not MUTMUT.exists():
        print(f"mutmut is not installed: {sys.executable} -m pip install 'mutmut>=3.8,<4'", file=sys.stderr)
        return 2
    missing = [m for m in modules if not present(m)]
    if missing:
        print(f"no such file yet: {', '.join(missing)}", file=sys.stderr)
        return 2
    codes = []
    for module in modules:
        # (the listed equivalent ones are left out: run them by name with --mutants)
        names = ([n for n, s in results(module).items() if s == "survived" and n not in EQUIVALENT]
                 if args.survivors else [])
        names += args.mutants
        if args.survivors and not names:
            print(f"==> {module}: no survivors to run again")
            continue
        codes.append(run(module, args.jobs, args.budget, names))
    return max(codes, default=0)


if __name__ == "__main__":
    sys.exit(main())
