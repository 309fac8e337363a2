"""The mapping from model.py's GPT to a GGUF file, llama.cpp's format (and so ollama's and LM Studio's),
written with ggml's own writer, the `gguf` package: a GPT-2-shaped model as llama.cpp's gpt2
architecture, a Llama-shaped one as its llama (arcee with ReLU² for SwiGLU), in f32, f16, bf16 or q8_0. The checkpoint's tokenizer
(GPT-2's or a trained BPE, both byte-level BPEs with GPT-2's split) goes into the file's metadata, with
<|endoftext|> put before every prompt as train.bin puts it before every story, so llama.cpp reads a
prompt as sample.py does. export.py --format=gguf writes one with it."""
import json

import torch

from hf import EOT, gpt2_tokenizer_json, llama_weights

TYPES = ('f32', 'f16', 'bf16', 'q8_0')


def gguf_tensors(model, arch, vocab_size):
    """model.py's weights (arch: the transformers class hf.architecture names) as llama.cpp names them, float32 numpy arrays (out, in) as nn.Linear has
    them, the first vocab_size tokens kept (the rest pad the vocabulary for speed)."""
    import gguf
    cfg = model.config
    if arch == 'GPT2LMHeadModel':
        arch = gguf.MODEL_ARCH.GPT2
        state = {k: v for k, v in model.state_dict().items() if not (k == 'lm_head.weight' and cfg.tie_embeddings)}
        if not cfg.bias:  # llama.cpp's gpt2 needs every bias; zeros compute what the bias-free model does
            for k, v in list(state.items()):
                if k.endswith(('ln_1.weight', 'ln_2.weight', 'ln_f.weight', 'c_attn.weight', 'c_proj.weight', 'c_fc.weight')):
                    state[k[:-len('weight')] + 'bias'] = torch.zeros(v.size(0))
    else:
        arch = gguf.MODEL_ARCH.ARCEE if arch == 'ArceeForCausalLM' else gguf.MODEL_ARCH.LLAMA
        state = llama_weights(model, cfg.vocab_size)
        if cfg.tie_embeddings:  # llama.cpp reads token_embd for the output when output.weight is absent
            del state['lm_head.weight']
        for k, v in state.items():  # llama.cpp rotates interleaved pairs, model.py dimension i with i + head_dim/2
            if k.endswith(('q_proj.weight', 'k_proj.weight', 'q_proj.bias', 'k_proj.bias')):
                state[k] = v.reshape(cfg.n_head, 2, v.size(0) // cfg.n_head // 2, *v.shape[1:]).swapaxes(1, 2).reshape(v.shape)
    names = gguf.get_tensor_name_map(arch, cfg.n_layer)
    tensors = {}
    for k, v in state.items():
        if k in ('transformer.wte.weight', 'model.embed_tokens.weight', 'lm_head.weight'):
            v = v[:vocab_size]
        tensors[names.get_name(k, try_suffixes=('.weight', '.bias'))] = v.detach().float().cpu().numpy()
    return arch, tensors


def tokenizer_fields(state, enc):
    """The tokens (as byte-level strings, in id order), their types and the merges of the checkpoint's
    tokenizer, from its tokenizer.json (GPT-2's built from tiktoken's ranks, as export.py's folder has it)."""
    import gguf
    spec = json.loads(gpt2_tokenizer_json(enc) if state['name'] == 'gpt2' else state['json'])
    ids = {**spec['model']['vocab'], **{t['content']: t['id'] for t in spec['added_tokens']}}
    tokens = sorted(ids, key=ids.get)
    if [ids[t] for t in tokens] != list(range(enc.n_vocab)):
        raise ValueError(f"the tokenizer's ids are not 0 to {enc.n_vocab - 1}")
    types = [gguf.TokenType.CONTROL if t == EOT else gguf.TokenType.NORMAL for t in tokens]
    # tokenizers writes a merge as "a b" (older files) or ["a", "b"]; GGUF as "a b"
    merges = [m if isinstance(m, str) else ' '.join(m) for m in spec['model']['merges']]
    return tokens, types, merges


def write_gguf(path, model, arch, state, enc, gguf_type, name, description, facts):
    """model (model.py's GPT, arch as hf.architecture names it) with its tokenizer (state, and enc its
    Encoding) as the GGUF file path, its matrices in gguf_type (one of TYPES); name, description and
    facts (a dict of str to str, int or float: where it comes from, how well it does) are metadata."""
    import gguf
    cfg = model.config
    arch, tensors = gguf_tensors(model, arch, enc.n_vocab)
    qtype = getattr(gguf.GGMLQuantizationType, gguf_type.upper())
    file_type = {'f32': 'ALL_F32', 'f16': 'MOSTLY_F16', 'bf16': 'MOSTLY_BF16', 'q8_0': 'MOSTLY_Q8_0'}[gguf_type]
    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[arch])
    writer.add_name(name)
    writer.add_description(description)
    writer.add_context_length(cfg.block_size)
    writer.add_embedding_length(cfg.n_embd)
    writer.add_block_count(cfg.n_layer)
    writer.add_head_count(cfg.n_head)
    writer.add_head_count_kv(cfg.n_head)
    if arch == gguf.MODEL_ARCH.GPT2:
        writer.add_feed_forward_length(4 * cfg.n_embd)
        writer.add_layer_norm_eps(1e-5)
    else:
        writer.add_feed_forward_length(model.transformer.h[0].mlp.hidden)
        writer.add_layer_norm_rms_eps(1e-5)
        writer.add_rope_freq_base(cfg.rope_theta)
        writer.add_rope_dimension_count(cfg.n_embd // cfg.n_head)
        writer.add_vocab_size(enc.n_vocab)
    writer.add_file_type(getattr(gguf.LlamaFileType, file_type))
    if gguf_type == 'q8_0':
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    tokens, types, merges = tokenizer_fields(state, enc)
    writer.add_tokenizer_model('gpt2')  # a byte-level BPE, as llama.cpp names it
    writer.add_tokenizer_pre('gpt-2')  # GPT-2's split into words, tokenizer.SPLIT
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(enc.eot_token)
    writer.add_eos_token_id(enc.eot_token)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    for key, value in facts.items():
        (writer.add_string if isinstance(value, str) else writer.add_uint32 if isinstance(value, int)
         else writer.add_float32)(f'tinystories_gpt.{key}', value)
    for key, data in tensors.items():
        # as llama.cpp's converter: vectors (norms, biases) and position embeddings stay float32, and a
        # matrix whose rows do not fill whole q8_0 blocks of 32 falls back to f16
        kind = qtype if data.ndim == 2 and not key.startswith('position_embd') else gguf.GGMLQuantizationType.F32
        try:
            data = gguf.quants.quantize(data, kind)
        except gguf.QuantError:
            kind = gguf.GGMLQuantizationType.F16
            data = gguf.quants.quantize(data, kind)
        writer.add_tensor(key, data, raw_dtype=kind)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
