"""
A decoding step compiled ahead of time by AOTInductor (torch.export, then inductor's C++), for
generate.py on the CPU: one call into a shared library a step, with no Python inside it, kept as a
package in a folder so that a later process loads it instead of compiling.
  run = aot_compiled(Step(model, options), args, 'out-cpu/compiled/best')
  next_tokens = run(list(args))[0]
"""
import glob
import hashlib
import inspect
import io
import os
import sys
import weakref

import torch

import layouts
import sampling
from common import atomic_output, log


def inductor_settings(autotune=True):
    """Freezing (the weights become constants) and, with autotune, the search for the fastest C++ GEMMs,
    which inductor's own TORCHINDUCTOR_MAX_AUTOTUNE=0 skips: half the compile, with kernels picked untimed.
    Without it the products are oneDNN's: for a prompt's read, whose length is free, inductor's C++ GEMM
    took 1.4-3.6x longer (run.sh's model, 96 tokens, 2 threads: float32 7.0-7.2 ms against 4.8-5.1, bf16
    9.5-11.3 against 2.6-4.0)."""
    # cpp.min_chunk_size: a loop runs on several threads from 4,096 elements a thread, not 512; a row's
    # 32 counts in top_k_floor, each split across threads, took ~94 us a step against ~15 on one
    return dict(freezing=True, max_autotune=autotune and os.environ.get('TORCHINDUCTOR_MAX_AUTOTUNE') != '0',
                **{'cpp.min_chunk_size': 4096},
                max_autotune_gemm_backends='CPP,ATEN', autotune_num_choices_displayed=0,
                max_autotune_report_choices_stats=False)


def weights_hash(model, weights):
    """A hash of model's weights' bytes, made once for their addresses and versions (weights)."""
    if HASHED.get(model, (None,))[0] != weights:
        digest = hashlib.sha256()
        for t in model.state_dict().values():
            digest.update(t.detach().cpu().contiguous().view(torch.uint8).numpy())
        HASHED[model] = weights, digest.hexdigest()[:16]
    return HASHED[model][1]


def package_name(module, args, weights, lengths, settings):
    """The file name of module's AOTInductor package for args: its kind, the weights' precision, a hash of them, then one
    of all else the compiled code depends on (the sources it is traced from, args' shapes, the settings,
    torch, the CPU and the threads it runs on)."""
    rest = hashlib.sha256(repr((torch.__version__, torch.backends.cpu.get_cpu_capability(), torch.get_num_threads(),
                                module.options, [(a.shape, a.stride(), a.dtype) for a in args], lengths, settings)).encode())
    for source in (sys.modules[type(module.model).__module__], layouts, sampling, sys.modules[type(module).__module__]):
        with open(source.__file__, 'rb') as f:
            rest.update(f.read())
    kind = 'int8' if any(t.dtype == torch.int8 for t in module.state_dict().values()) else \
        str(module.model.transformer.wte.weight.dtype).removeprefix('torch.')
    return f"{type(module).__name__.lower()}-{kind}-{weights_hash(module.model, weights)}-{rest.hexdigest()[:16]}.pt2"


def tidy(store, name):
    """Remove from store the packages of other weights in name's precision (an earlier checkpoint's: a
    float32 and a bf16 package of one checkpoint both stay), and all but the KEEP last used."""
    packages = sorted((os.path.getmtime(p), p) for p in glob.glob(os.path.join(store, '*.pt2')))
    for i, (_, old) in enumerate(reversed(packages)):
        parts = os.path.basename(old).split('-')
        if i >= KEEP or len(parts) != 4 or parts[1] == name.split('-')[1] and parts[2] != name.split('-')[2]:
            os.remove(old)


KEEP = 16  # packages kept in a folder, the last used: sample.py's and serve.py's of each precision, other settings
# a model's compiled programs, aot_compiled's (not an attribute of the model: torch.export copies those)
COMPILED = weakref.WeakKeyDictionary()
HASHED = weakref.WeakKeyDictionary()  # a model's (weights' addresses and versions, hash of their bytes): weights_hash's
TENSORS = weakref.WeakKeyDictionary()  # a model's parameters and buffers: weights_version's


def weights_version(model):
    """The addresses and versions of model's weights, which change with them (an optimizer step, load_state_dict,
    .to()). They are listed once per model: walking its modules costs ~0.7 ms, a tenth of a short story's time."""
    if model not in TENSORS:
        TENSORS[model] = (*model.parameters(), *model.buffers())
    return ','.join(f'{t.data_ptr()}:{t._version}' for t in TENSORS[model])


def aot_compiled(module, args, store=None, lengths=None, autotune=True):
    """module (generate.py's Step or Prefill, rows.py's Logits) compiled ahead of time for args by AOTInductor into one C++ call
    (inductor_settings(autotune)'), the weights frozen in as constants: returns
    run(list of tensors) -> list of outputs. It is kept on the model for its weights as they are now
    (a change to them, an optimizer step or load_state_dict, compiles it again). With store, a folder,
    the package is kept there too, and another process loads it in a fraction of a second instead of
    compiling (~30 s); when one is written, the folder is tidied (tidy). lengths=(shortest, longest): one
    program for every length of args[0]'s dimension 1 between them."""
    model = module.model
    weights = weights_version(model)
    shaped = args[1:] if lengths else args
    key = (type(module), weights, module.options, tuple((a.shape, a.dtype) for a in shaped), torch.get_num_threads(), lengths, autotune)
    kept = COMPILED.setdefault(model, {})
    if key in kept:
        return kept[key]
    for old in [k for k in kept if k[1] != weights]:
        del kept[old]
    settings = inductor_settings(autotune)
    name = package_name(module, shaped, weights, lengths, settings)
    path = store and os.path.join(store, name)
    if path and os.path.exists(path):
        package = path
        os.utime(path)  # used: the newest are kept
    else:
        dims = None
        if lengths:  # forward(first, ..., *layers): a spec for each named argument, a tuple of them for the layers
            named = sum(p.kind == p.POSITIONAL_OR_KEYWORD for p in inspect.signature(module.forward).parameters.values())
            dims = ({1: torch.export.Dim('T', min=lengths[0], max=lengths[1])}, *(None,) * (named - 1),
                    (None,) * (len(args) - named))
        exported = torch.export.export(module.eval(), tuple(args), strict=False, dynamic_shapes=dims)
        package = io.BytesIO()
        torch._inductor.aoti_compile_and_package(exported, package_path=package, inductor_configs=settings)
        package.seek(0)
        if path:
            try:
                os.makedirs(store, exist_ok=True)
                with atomic_output(path) as tmp, open(tmp, 'wb') as f:
                    f.write(package.getbuffer())
                tidy(store, name)
            except OSError as e:
                log(f"warning: cannot keep the compiled step in {store} ({e.strerror or e}): it is compiled again next time")
    kept[key] = torch._inductor.aoti_load_package(package, run_single_threaded=True).loader.run
    return kept[key]
