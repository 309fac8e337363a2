"""
Export a checkpoint to share or serve it: a transformers model folder (the Hugging Face Hub,
transformers pipelines, text-generation servers), or one GGUF file for llama.cpp and what is built
on it (ollama, LM Studio):
  $ python export.py --out_dir=out-small --export_dir=tinystories-gpt
  $ python export.py --ckpt=last --export_dir=tinystories-gpt --overwrite=True
  $ python export.py --out_dir=out-cpu --format=gguf                # out-cpu/model-f32.gguf
  $ python export.py --out_dir=out-cpu --format=gguf --gguf_type=q8_0 --gguf_file=stories-q8_0.gguf
A GPT-2-shaped model becomes a GPT2LMHeadModel (llama.cpp's gpt2); one with Llama's options (rope,
rmsnorm, swiglu) a LlamaForCausalLM (llama.cpp's llama), with relu2 for swiglu an ArceeForCausalLM
(llama.cpp's arcee). The folder holds model.safetensors,
config.json, generation_config.json, the checkpoint's tokenizer (tokenizer.json: GPT-2's, or the
trained BPE's) and a README.md model card; AutoModelForCausalLM.from_pretrained(folder) and
AutoTokenizer.from_pretrained(folder) load it offline. The GGUF file holds the weights, the tokenizer
and what the card says (gguf_file.py). It needs only the checkpoint: the training data, if still
there, adds figures. An export appears complete or not at all.
"""
import math
import os
import re
import shutil

import numpy as np

from common import checkpoint_path, die, load_for_generation, lock_folder, log, open_split, read_meta
from tokenizer import checkpoint_tokenizer, token_bytes
from hf import architecture, save_gpt2, save_llama, save_tokenizer
from gguf_file import TYPES, write_gguf

# -----------------------------------------------------------------------------
out_dir = 'out-small'  # where train.py saved its checkpoints (its default)
ckpt = 'best'  # best or last (out_dir/best.pt, out_dir/last.pt), or the path of a checkpoint
format = 'hf'  # 'hf': a transformers folder; 'gguf': one .gguf file for llama.cpp
export_dir = ''  # format=hf: the folder to write; empty: out_dir/hf
gguf_file = ''  # format=gguf: the file to write; empty: out_dir/model-GGUF_TYPE.gguf
gguf_type = 'f32'  # format=gguf: the matrices' type, 'f32', 'f16', 'bf16' or 'q8_0' (vectors stay f32)
overwrite = False  # replace export_dir (or gguf_file) when it already holds files
# -----------------------------------------------------------------------------


def bits_per_byte(loss, tokens, enc):
    """A mean loss in nats per token over these tokens as bits per byte, counting bytes as eval.py
    does (tokenizer.token_bytes)."""
    n_bytes = int(np.bincount(tokens, minlength=enc.n_vocab) @ token_bytes(enc))
    return loss * len(tokens) / math.log(2) / n_bytes


def remove_stale_exports(export_dir):
    """Remove the temporary folders or files (.NAME.tmpPID) that exports into export_dir (a folder or
    a .gguf file) left beside it when killed outright (kill -9, out of memory). Called under its lock:
    their runs are over."""
    parent, name = os.path.split(os.path.abspath(export_dir))
    for entry in sorted(os.listdir(parent)):
        if re.fullmatch(rf'\.{re.escape(name)}\.tmp\w+(\.old)?', entry):
            stale = os.path.join(parent, entry)
            if os.path.isdir(stale):
                shutil.rmtree(stale, ignore_errors=True)
            else:
                os.remove(stale)
            log(f"removed {stale}, left by an export that was killed")


def training_data(data_dir, state):
    """data_dir's meta.json if it still holds the data the checkpoint was trained on (made by its
    tokenizer), else None and why not."""
    if not os.path.isfile(os.path.join(data_dir, 'meta.json')):
        return None, f"{data_dir or 'its data_dir'} was not there at export"
    meta = read_meta(data_dir)
    path = os.path.join(data_dir, 'tokenizer.json')
    if state['json'] is not None:
        try:
            with open(path, encoding='utf-8') as f:
                same = f.read() == state['json']
        except OSError:
            same = False
    else:
        same = meta.get('tokenizer', 'gpt2') == 'gpt2'
    return (meta, None) if same else (None, f"{data_dir} has been prepared again since, with another tokenizer")


def origin(checkpoint):
    """Where the model's training started, in a sentence."""
    # a resumed run's config says init_from='resume'; train.py records where its first run started
    started = checkpoint.get('started_from', (checkpoint.get('config') or {}).get('init_from', 'scratch'))
    return ("Trained from scratch with tinystories-gpt's train.py" if started == 'scratch' else
            f"Fine-tuned from {started} with tinystories-gpt's train.py" if started != 'resume' else
            "Trained with tinystories-gpt's train.py in more than one run (resumed), from a start its "
            "checkpoint does not record")


def gguf_facts(checkpoint, tokenizer, bpb):
    """What a GGUF file records of its training beside the weights: the settings worth knowing (those
    the checkpoint has) and its figures."""
    config = checkpoint.get('config') or {}
    facts = {k: config[k] for k in ('data_dir', 'batch_size', 'gradient_accumulation_steps', 'learning_rate',
                                    'max_iters', 'weight_decay', 'dropout', 'optimizer', 'seed') if k in config}
    facts.update(tokenizer=tokenizer, iter_num=checkpoint.get('iter_num'), best_val_loss=checkpoint.get('best_val_loss'),
                 bits_per_byte=bpb)
    return {k: v for k, v in facts.items() if isinstance(v, (str, int, float)) and not isinstance(v, bool)}


def model_card(name, arch, path, checkpoint, model, tokenizer, meta, no_meta, bpb):
    """README.md for the folder: what the model is, what it was trained on, how well it does."""
    args, config = checkpoint['model_args'], checkpoint.get('config') or {}
    data = config.get('data_dir', 'unknown data')
    if meta:
        data += f" ({meta['train']['tokens']:,} training tokens from {meta.get('source', 'an unknown source')})"
    else:
        data += f" (its token counts and bits per byte are not given: {no_meta})"
    loss = checkpoint.get('best_val_loss')
    tokenized = "GPT-2's BPE" if tokenizer == 'gpt2' else f"a byte-level BPE of {tokenizer[4:]} tokens trained on it"
    lines = [f"- Training data: {data}, tokenized with {tokenized}",
             f"- Steps: {checkpoint.get('iter_num', 'unknown')} (checkpoint {os.path.basename(path)})"]
    if loss is not None and math.isfinite(loss):
        lines.append(f"- Validation loss: {loss:.4f} nats/token, the best of train.py's evaluations "
                     f"({config.get('eval_iters', '?')} batches each)")
    if bpb:
        lines.append(f"- Bits per byte: {bpb:.4f} (that loss over the bytes per token of validation.bin; "
                     "eval.py scores the whole split exactly)")
    if arch == 'GPT2LMHeadModel' and not args.get('bias', True):
        lines.append("- Trained without biases; GPT-2's are stored as zeros, which compute the same model")
    cfg = model.config
    gpt2 = arch == 'GPT2LMHeadModel'
    shape, tag = ('GPT-2', 'gpt2') if gpt2 else ('Llama', 'arcee' if cfg.mlp == 'relu2' else 'llama')
    mlp = "ReLU² (relu(x)^2 between two matrices), as Arcee's AFM" if cfg.mlp == 'relu2' else 'SwiGLU, as Llama'
    parts = '' if gpt2 else f"; rotary positions (theta {cfg.rope_theta:g}), RMSNorm and {mlp}"
    return f"""---
library_name: transformers
pipeline_tag: text-generation
tags: [{tag}, tinystories-gpt]
---
# {name}

A {shape}-shaped language model of {model.get_num_params() / 1e6:.2f}M parameters (not counting the
embeddings that are only looked up): {cfg.n_layer} layers, {cfg.n_head} heads, {cfg.n_embd} wide, a context
of {cfg.block_size} tokens{parts}. {origin(checkpoint)}.

{chr(10).join(lines)}

```python
from transformers import pipeline
generate = pipeline('text-generation', model='{name}')
print(generate('Once upon a time', max_new_tokens=100, do_sample=True)[0]['generated_text'])
```
"""


def write_folder(tmp, export_dir, model, arch, state, enc, card):
    """The transformers folder, made in tmp (empty) and then put in export_dir's place."""
    # a padded vocabulary's extra rows have no token: the tokenizer ends at enc.n_vocab
    (save_gpt2 if arch == 'GPT2LMHeadModel' else save_llama)(model, tmp, enc.n_vocab, enc.eot_token)
    save_tokenizer(state, enc, tmp, model.config.block_size)
    with open(os.path.join(tmp, 'README.md'), 'w') as f:
        f.write(card)
    # safetensors' file is private, and so may the folder be; an exported model is meant to be shared
    for file in os.listdir(tmp):
        os.chmod(os.path.join(tmp, file), 0o644)
    os.chmod(tmp, 0o755)
    if os.path.isdir(export_dir):  # empty, or to be replaced: swap it out, then drop it
        old = tmp + '.old'
        os.rename(export_dir, old)
        os.rename(tmp, export_dir)
        shutil.rmtree(old)
    else:
        os.rename(tmp, export_dir)


if __name__ == '__main__':
    exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())
    if format not in ('hf', 'gguf'):
        die(f"format={format!r} is neither 'hf' (a transformers folder) nor 'gguf' (a file for llama.cpp)")
    to_gguf = format == 'gguf'
    if to_gguf and gguf_type not in TYPES:
        die(f"gguf_type={gguf_type!r} is not one of {', '.join(TYPES)} (llama.cpp's llama-quantize takes a file further)")
    if to_gguf:
        try:
            import gguf  # noqa: F401
        except ImportError:
            die("format=gguf needs the gguf package, ggml's GGUF writer: pip install gguf")
    setting = 'gguf_file' if to_gguf else 'export_dir'
    target = (gguf_file or os.path.join(out_dir, f'model-{gguf_type}.gguf')) if to_gguf else (export_dir or os.path.join(out_dir, 'hf'))
    lock_folder(target, f'choose another --{setting}')
    remove_stale_exports(target)
    if os.path.exists(target) and os.path.isdir(target) == to_gguf:
        die(f"{setting} {target} is a {'folder' if to_gguf else 'file'}: choose another --{setting}")
    if os.path.exists(target) and (to_gguf or os.listdir(target)) and not overwrite:
        die(f"{setting} {target} already {'exists' if to_gguf else 'holds files'}: choose another --{setting}, "
            "or replace it with --overwrite=True")
    path = checkpoint_path(out_dir, ckpt)
    if os.path.abspath(path) == os.path.abspath(target) or os.path.abspath(path).startswith(os.path.join(os.path.abspath(target), '')):
        die(f"{setting} {target} {'is' if to_gguf else 'holds'} the checkpoint {path}, which replacing it would delete: "
            f"choose another --{setting}")
    model, enc, checkpoint = load_for_generation(path)  # the float32 weights, as trained
    arch = architecture(checkpoint['model_args'])  # or one line naming the options it lacks

    # the checkpoint knows its tokenizer; the data it was trained on, if still there, gives the card its figures
    state = checkpoint_tokenizer(checkpoint)
    data_dir = (checkpoint.get('config') or {}).get('data_dir', '')
    meta, no_meta = training_data(data_dir, state)
    loss = checkpoint.get('best_val_loss')
    bpb = None
    if meta and os.path.isfile(os.path.join(data_dir, 'validation.bin')) and loss is not None and math.isfinite(loss):
        bpb = bits_per_byte(loss, open_split(data_dir, meta, 'validation'), enc)

    parent, name = os.path.split(os.path.abspath(target))
    tmp = os.path.join(parent, f'.{name}.tmp{os.getpid()}')  # lock_folder made parent
    shape = 'GPT-2' if arch == 'GPT2LMHeadModel' else 'Llama'
    try:
        if to_gguf:
            description = (f"A {shape}-shaped language model of {model.get_num_params() / 1e6:.2f}M parameters. "
                           f"{origin(checkpoint)}.")
            write_gguf(tmp, model, arch, state, enc, gguf_type, os.path.splitext(name)[0], description,
                       gguf_facts(checkpoint, state['name'], bpb))
            os.chmod(tmp, 0o644)
            os.replace(tmp, target)
        else:
            try:
                os.mkdir(tmp)
            except OSError as e:
                die(f"cannot write next to export_dir {target}: {e.strerror or e}")
            card = model_card(name, arch, path, checkpoint, model, state['name'], meta, no_meta, bpb)
            write_folder(tmp, target, model, arch, state, enc, card)
    except OSError as e:
        die(f"cannot write {setting} {target}: {e.strerror or e}: make room, or choose another --{setting}")
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        elif os.path.exists(tmp):
            os.remove(tmp)
    if to_gguf:
        print(f"exported {path} (iter {checkpoint.get('iter_num')}) as a {shape}-shaped {gguf_type} GGUF file for llama.cpp "
              f"to {target} ({os.path.getsize(target) / 1e6:.1f} MB)")
    else:
        print(f"exported {path} (iter {checkpoint.get('iter_num')}) as a {arch} to {target}: "
              f"{', '.join(sorted(os.listdir(target)))}")
