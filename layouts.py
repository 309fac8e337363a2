"""
Weights laid out for decoding, swapped into a model once it is loaded for generation (sample.py,
serve.py, eval.py: common.load_for_generation). Decoding one token reads every weight once:
  use_fast_linears(model)  # CPU: each nn.Linear multiplies by a copy of its weight in a faster layout
  use_int8_weights(model)  # any device: each nn.Linear holds int8 weights, one byte a weight read
Neither changes the model's parameters, state_dict or weight tying; int8 changes the model's outputs
a little (eval.py --int8=True gives its loss), and such a model is for inference only.
"""
import torch
import torch.nn as nn
from torch.nn import functional as F

# F.linear reads PyTorch's (out, in) layout at a fraction of memory speed; a copy laid out for a
# faster kernel reads it faster.

ONEDNN_X86 = torch.backends.mkldnn.is_available() and torch.backends.cpu.get_cpu_capability() in ('AVX2', 'AVX512')
ONEDNN_X86_BF16 = ONEDNN_X86 and torch.ops.mkldnn._is_mkldnn_bf16_supported()
# On an x86 CPU without oneDNN's bf16 kernels (AVX2 alone), aten's bf16 GEMM ran 95 rows through run.sh's
# model's products at 7-10 GFLOP/s, float32's at 56-90 (2 cores): a bf16 product of more rows than this runs in
# float32, its weight widened (a float32 copy), its result rounded back. At fewer rows (decoding steps) the
# weights' bytes rule.
BF16_ROWS = 8


def fast_layout(w, rows, dtype):
    """The layout of w's inference copy for a product with `rows` rows in dtype, None for F.linear.
    Measured on a 2-core AVX-512 CPU (bench.py --parts=sample and the products alone): oneDNN's
    packed layout runs 1.5-3x F.linear in fp32 and bf16, but its ~15 us per call loses to MKL on
    the transposed matrix for one row through a small fp32 matrix (under 2^18 weights), and one row
    through a large one (the output layer) streams fastest as the transposed matrix cut into 4
    column blocks whose products run in parallel. Without oneDNN's x86 kernels fp32 keeps the
    transposed matrix (~3x F.linear at one row here) and bf16 F.linear."""
    if dtype == torch.float32:
        if not ONEDNN_X86 or rows == 1 and w.numel() < 2 ** 18:
            return 'transposed'
        return 'columns' if rows == 1 and w.numel() >= 2 ** 22 else 'packed'
    return 'packed' if dtype == torch.bfloat16 and ONEDNN_X86_BF16 else None


def lay_out(w, layout):
    """w's inference copy in the layout fast_layout chose."""
    if layout == 'packed':  # the batch size is only a hint to oneDNN: 8 measured as fast as 1 at batch 1
        return torch.ops.mkldnn._reorder_linear_weight(w, 8)
    if layout == 'transposed':
        return w.t().contiguous()
    out_features, in_features = w.shape
    blocks = 4  # 2 and 8 measured slower on the output layer
    width = -(-out_features // blocks)
    wt = w.new_zeros(in_features, blocks * width)  # padded, so the blocks are equally wide
    wt[:, :out_features] = w.t()
    return wt.view(in_features, blocks, width).transpose(0, 1).contiguous()


def product(x, copy, bias, layout, out_features):
    """x times the weight laid out by lay_out (copy), plus bias."""
    if layout == 'packed':
        return torch.ops.mkldnn._linear_pointwise(x, copy, bias, 'none', [], '')
    x2 = x.reshape(-1, x.size(-1))
    if layout == 'transposed':
        y = torch.mm(x2, copy) if bias is None else torch.addmm(bias, x2, copy)
    else:  # 'columns': one matmul per column block, run in parallel as a batch
        y = torch.bmm(x2.expand(len(copy), -1, -1), copy).transpose(0, 1).reshape(len(x2), -1)[:, :out_features]
        y = y if bias is None else y + bias
    return y.view(*x.shape[:-1], -1)


class FastLinear(nn.Linear):
    """nn.Linear that, in inference on the CPU, multiplies by a copy of its weight in fast_layout's
    layout, made on first use in the dtype the product runs in: autocast's, else the weight's, but
    float32 for a bf16 product of more than BF16_ROWS rows on an x86 CPU without oneDNN's bf16 kernels.
    A copy is kept for each layout used, up to twice the weights' memory (three times in that case): a
    prompt's read and the steps after it take different ones, and laying out run.sh's model again took
    ~25 ms (oneDNN's reorder, ~1 ms a matrix), several eager steps. The copies are dropped when the
    weight changes and by train(). Its parameters, state_dict and weight tying are those of the
    nn.Linear it replaced."""
    source = None  # the weight the copies were made from; held, so that a new weight cannot reuse its address
    version = None  # the weight's version then (an optimizer step or load_state_dict bumps it)
    laid_out = None  # {(layout, dtype): the copy}

    def forward(self, x):
        w = self.weight
        if self.training or torch.is_grad_enabled() or w.device.type != 'cpu':
            return F.linear(x, w, self.bias)
        dtype = torch.get_autocast_dtype('cpu') if torch.is_autocast_enabled('cpu') else w.dtype
        rows = x.numel() // x.size(-1)  # symbolic (not an int) in a prompt's read compiled for any length
        wide = (dtype == torch.bfloat16 and ONEDNN_X86 and not ONEDNN_X86_BF16
                and not (isinstance(rows, int) and rows <= BF16_ROWS))
        # under torch.compile the compiler lays the weights out itself (and the checks below would break its graph)
        if torch.compiler.is_compiling():
            if wide:  # with the weights frozen, the compiler keeps their float32 copy
                return F.linear(x.float(), w.float(), None if self.bias is None else self.bias.float()).to(dtype)
            return F.linear(x, w, self.bias)
        run = torch.float32 if wide else dtype  # the dtype the product runs in
        layout = fast_layout(w, rows, run)
        if layout is None:
            return F.linear(x, w, self.bias)
        version = None if w.is_inference() else w._version  # a weight made in inference mode keeps no version
        if self.source is None or self.source.data_ptr() != w.data_ptr() or self.version != version:
            self.source, self.version, self.laid_out = w.detach(), version, {}
        copy = self.laid_out.get((layout, run))
        if copy is None:
            copy = self.laid_out[layout, run] = lay_out(self.source.to(run), layout)
        x, bias = x if x.dtype == run else x.to(run), None if self.bias is None else self.bias.to(run)
        if wide:
            with torch.autocast('cpu', enabled=False):  # autocast would take torch.mm back to bf16
                return product(x, copy, bias, layout, len(w)).to(dtype)
        return product(x, copy, bias, layout, len(w))

    def train(self, mode=True):
        self.source = self.version = self.laid_out = None
        return super().train(mode)


def use_fast_linears(model):
    """Swap every nn.Linear of a model on the CPU for a FastLinear holding the same parameters (tied
    weights stay tied; state_dict is unchanged). Done once; nothing to do on other devices."""
    if next(model.parameters()).device.type != 'cpu':
        return model
    for module in list(model.modules()):
        for name, child in module.named_children():
            if type(child) is nn.Linear:
                with torch.device('meta'):  # no memory for weights that are replaced at once
                    fast = FastLinear(child.in_features, child.out_features, bias=child.bias is not None)
                fast.weight, fast.bias = child.weight, child.bias
                fast.train(child.training)
                setattr(module, name, fast)
    return model


class Int8Linear(nn.Module):
    """An nn.Linear's weight rounded to int8 with one float scale per output (weight-only: the
    activations keep their dtype, but go through bf16 for the product), multiplied by torch's own int8
    kernel (_weight_int8pack_mm, which torch.compile's C++ GEMM template also takes on the CPU). Half
    bf16's bytes a weight: it pays where reading the weights bounds a token (config/small.py and larger)."""

    def __init__(self, linear):
        super().__init__()
        w = linear.weight.detach().float()
        scales = w.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny) / 127
        self.register_buffer('weight', torch.round(w / scales[:, None]).to(torch.int8))
        self.register_buffer('scales', scales.to(linear.weight.dtype))
        self.bias = linear.bias

    def forward(self, x):
        # the kernel is made for bf16: fed float32 it ran 30-35x slower (2-core AVX2 EPYC, a 384 x 1536 weight:
        # 8 rows 6.1 ms against 0.17, one row 0.48 against 0.06), so float32 activations are rounded to bf16 for it
        a = x.to(torch.bfloat16) if x.dtype == torch.float32 else x
        y = torch.ops.aten._weight_int8pack_mm(a.reshape(-1, a.size(-1)), self.weight, self.scales.to(a.dtype))
        y = y.view(*x.shape[:-1], -1).to(x.dtype)
        return y if self.bias is None else y + self.bias


def use_int8_weights(model):
    """Swap every nn.Linear (FastLinear) of a model for an Int8Linear of its weight; for inference only."""
    for module in list(model.modules()):
        for name, child in module.named_children():
            if isinstance(child, nn.Linear):
                setattr(module, name, Int8Linear(child))
    return model
