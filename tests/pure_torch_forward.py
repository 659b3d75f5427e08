"""TEST-ONLY: an exported model's forward in a process where megatron-core cannot be imported and nothing may be
unpickled. Run as `python pure_torch_forward.py EXPORT_DIR INPUTS OUT` (INPUTS: safetensors written by
parallel_worker.py's `reference` mode); writes the predicted velocity of the target tokens to OUT (safetensors)
and prints one JSON line: the error `import megatron` raised, the megatron modules loaded (none), and the
pickle audit events seen while loading and running the model (none)."""

import json
import sys

sys.modules["megatron"] = None  # from here on, `import megatron` and `import megatron.core` raise ImportError
try:
    import megatron.core  # noqa: F401
    megatron_error = None
except ImportError as exc:
    megatron_error = f"{type(exc).__name__}: {exc}"

unpickled: list[str] = []


def audit(event: str, args) -> None:
    if event == "pickle.find_class":  # raised by every unpickler that resolves a class or function
        unpickled.append(f"{args[0]}.{args[1]}")


import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from vincie.inference.export import load_model  # noqa: E402
from vincie.model.attention import MaskSpec  # noqa: E402
from vincie.model.diffusion import output_to_velocity  # noqa: E402
from vincie.model.mmdit import ModelInputs  # noqa: E402


def main() -> None:
    export_dir, inputs_path, out = sys.argv[1:]
    sys.addaudithook(audit)
    cfg, model, _, _ = load_model(export_dir, torch.device("cpu"))
    saved = load_file(inputs_path)
    with safe_open(inputs_path, "pt") as f:
        full_attention = f.metadata()["full_attention"] == "True"
    spec = MaskSpec(saved["mask.token_block"], saved["mask.token_sample"], saved["mask.block_noisy"], full_attention)
    inputs = ModelInputs(**{name: saved[name] for name in ("text_tokens", "latent_tokens", "text_index",
                                                            "latent_index", "positions", "block_t", "block_type",
                                                            "block_turn")}, mask=spec)
    with torch.no_grad():
        output = model(inputs)
    select = saved["target_select"]
    velocity = output_to_velocity(output[select], inputs.latent_tokens[select], saved["target_t"],
                                  cfg.diffusion.prediction)
    save_file({"velocity": velocity.contiguous()}, out)
    loaded = sorted(m for m, module in sys.modules.items() if m.split(".")[0] == "megatron" and module is not None)
    print(json.dumps({"megatron_error": megatron_error, "megatron_modules": loaded, "unpickled": unpickled}))


if __name__ == "__main__":
    main()
