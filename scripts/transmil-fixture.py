"""Writes stages/mil/tests/fixtures/transmil.safetensors: weights, bags and logits of the TransMIL
authors' own PyTorch model, which tessera's `transmil` must reproduce (unit test
`models::transmil::tests::authors_pytorch_fixture`).

The authors' code is not copied here: pass their `models/TransMIL.py`
(github.com/szc19990412/TransMIL) with `--transmil-py`; it imports `NystromAttention` from
lucidrains' `nystrom-attention` (pip install nystrom-attention einops torch safetensors).
Their `TransMIL` is built, then its 512-wide parts are swapped for `dim`-wide ones made by
their own `TransLayer` and `PPEG` classes, so that their `forward` runs unchanged:
- `_fc1` becomes the identity: tessera's shared instance encoder plays it, so the fixture's
  bags are what the transformer reads;
- `_fc2` is tessera's head with no hidden layer (`head.out`);
- layer norms and the class token get non-default values so they are tested too.
Their forward moves the class token to CUDA; on a CPU-only machine `Tensor.cuda` is made a
no-op for the run.

Fixture tensors (tessera's parameter names): `transmil.*`, `head.out.*`, and per bag k
`bag{k}.x` `[n_k, dim]` (float32, as the authors' `.float()`) and `bag{k}.logits` `[1, C]`.

    python3 scripts/transmil-fixture.py --transmil-py /path/to/TransMIL/models/TransMIL.py
"""
import argparse
import importlib.util
import os

import torch
from safetensors.torch import save_file

DIM = 16
CLASSES = 3
BAGS = [5, 20, 70]


def load_authors(path):
    spec = importlib.util.spec_from_file_location("authors_transmil", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--transmil-py", required=True)
    here = os.path.dirname(os.path.abspath(__file__))
    parser.add_argument(
        "--out",
        default=os.path.join(here, "..", "stages", "mil", "tests", "fixtures", "transmil.safetensors"),
    )
    args = parser.parse_args()
    authors = load_authors(args.transmil_py)
    torch.manual_seed(2021)
    if not torch.cuda.is_available():
        torch.Tensor.cuda = lambda self, *a, **k: self

    model = authors.TransMIL(n_classes=CLASSES)
    model._fc1 = torch.nn.Identity()
    model.pos_layer = authors.PPEG(dim=DIM)
    model.cls_token = torch.nn.Parameter(torch.randn(1, 1, DIM))
    model.layer1 = authors.TransLayer(dim=DIM)
    model.layer2 = authors.TransLayer(dim=DIM)
    model.norm = torch.nn.LayerNorm(DIM)
    model._fc2 = torch.nn.Linear(DIM, CLASSES)
    with torch.no_grad():
        for norm in [model.layer1.norm, model.layer2.norm, model.norm]:
            norm.weight.copy_(1.0 + 0.2 * torch.randn(DIM))
            norm.bias.copy_(0.2 * torch.randn(DIM))
    model.eval()

    names = {"_fc2.weight": "head.out.weight", "_fc2.bias": "head.out.bias"}
    tensors = {}
    for name, value in model.state_dict().items():
        ours = names.get(name, "transmil." + name.replace("to_out.0.", "to_out."))
        tensors[ours] = value.detach().float().contiguous()
    with torch.no_grad():
        for k, n in enumerate(BAGS):
            x = torch.randn(1, n, DIM)
            logits = model(data=x)["logits"]
            tensors[f"bag{k}.x"] = x[0].contiguous()
            tensors[f"bag{k}.logits"] = logits.float().contiguous()
            print(f"bag {k}: {n} instances, logits {logits.tolist()}")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    save_file(tensors, args.out, metadata={"source": "szc19990412/TransMIL models/TransMIL.py",
                                            "torch": torch.__version__})
    print(f"wrote {args.out} ({os.path.getsize(args.out)} bytes, {len(tensors)} tensors)")


if __name__ == "__main__":
    main()
