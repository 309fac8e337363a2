"""The mapping between model.py's GPT and transformers' models, both ways: GPT2LMHeadModel
(parameter names, the transposed Conv1D weights, configs), LlamaForCausalLM for a model with all
of Llama's options, and the tokenizer files (GPT-2's built from tiktoken's data, a trained BPE's
tokenizer.json as the checkpoint holds it). export.py writes a transformers folder with it;
train.py's init_from (gpt2, or such a folder) reads one.
transformers, tokenizers and safetensors are imported inside the functions: only these two
paths need them."""
import json
import os
import pickle

import torch

from common import die, log
from tokenizer import byte_of_char

# GPT-2 keeps these in Conv1D modules, which store the weight as (in, out): nn.Linear's transpose
CONV1D = ('attn.c_attn.weight', 'attn.c_proj.weight', 'mlp.c_fc.weight', 'mlp.c_proj.weight')
# the options that choose the architecture, as each transformers model has them
GPT2_SHAPE = dict(pos_emb='learned', norm='layernorm', mlp='gelu')
LLAMA_SHAPE = dict(pos_emb='rope', norm='rmsnorm', mlp='swiglu')
ARCEE_SHAPE = dict(pos_emb='rope', norm='rmsnorm', mlp='relu2')  # Llama with ReLU² for SwiGLU: Arcee's AFM
SHAPES = {'GPT2LMHeadModel': GPT2_SHAPE, 'LlamaForCausalLM': LLAMA_SHAPE, 'ArceeForCausalLM': ARCEE_SHAPE}
# model_args that either model holds as they are: sizes, biases (GPT-2's as zeros when absent,
# Llama's attention_bias and mlp_bias), a separate output layer, and the rotary base
FREE = ('n_layer', 'n_head', 'n_embd', 'block_size', 'vocab_size', 'dropout', 'attn_dropout', 'bias', 'tie_embeddings',
        'rope_theta')
EOT = '<|endoftext|>'


def transposed(state_dict):
    """model.py's state_dict as GPT2LMHeadModel names it, or the reverse: the names are the same
    and the Conv1D weights are transposed. The tied lm_head and attention-mask buffers are left out."""
    return {k: (v.t() if k.endswith(CONV1D) else v).contiguous() for k, v in state_dict.items()
            if k.startswith('transformer.') and not k.endswith(('.attn.bias', '.attn.masked_bias'))}


def architecture(model_args):
    """The transformers class that holds a model with these options, or one line naming those
    that have no counterpart there."""
    from model import GPTConfig
    shape = {k: model_args.get(k, getattr(GPTConfig, k)) for k in GPT2_SHAPE}
    unknown = {k: v for k, v in model_args.items() if k not in FREE + tuple(shape) and v != getattr(GPTConfig, k, None)}
    if unknown:  # an option model.py gained after this mapping was written
        die(f"{', '.join(f'{k}={v!r}' for k, v in unknown.items())}: no counterpart in {', '.join(SHAPES)}, "
            "the models export.py writes (for transformers and llama.cpp alike)")
    for arch, target in SHAPES.items():
        if shape == target:
            return arch
    named = lambda target: ', '.join(f'{k}={v!r}' for k, v in shape.items() if v != target[k])
    die(f"{', '.join(f'{k}={v!r}' for k, v in shape.items())}: no transformers or llama.cpp model has this combination "
        f"({named(GPT2_SHAPE)}: none in GPT2LMHeadModel; {named(LLAMA_SHAPE)}: none in LlamaForCausalLM); "
        "export takes GPT-2's three (learned, layernorm, gelu) or Llama's (rope, rmsnorm, swiglu or relu2)")


def save_gpt2(model, folder, vocab_size, eot_token):
    """model.py's GPT as folder/model.safetensors, config.json and generation_config.json for
    GPT2LMHeadModel, keeping the first vocab_size tokens (the rest pad the vocabulary for speed)."""
    from transformers import GPT2Config
    cfg = model.config
    state = transposed(model.state_dict())
    state['transformer.wte.weight'] = state['transformer.wte.weight'][:vocab_size]
    if not cfg.tie_embeddings:
        state['lm_head.weight'] = model.lm_head.weight[:vocab_size]
    if not cfg.bias:  # GPT-2 always has biases; zeros compute exactly what the bias-free model does
        for k, v in list(state.items()):
            if k.endswith(('ln_1.weight', 'ln_2.weight', 'ln_f.weight') + CONV1D):
                state[k[:-len('weight')] + 'bias'] = torch.zeros(v.size(-1), dtype=v.dtype)
    save_weights(state, folder)
    GPT2Config(vocab_size=vocab_size, n_positions=cfg.block_size, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
               n_head=cfg.n_head, activation_function='gelu',  # model.py's exact GELU, not GPT-2's tanh one
               resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.attention_dropout(), layer_norm_epsilon=1e-5,
               bos_token_id=eot_token, eos_token_id=eot_token, tie_word_embeddings=cfg.tie_embeddings,
               architectures=['GPT2LMHeadModel']).save_pretrained(folder)
    save_generation_config(folder, eot_token)


def llama_config(config, hidden, vocab_size, eot_token=None):
    """The LlamaConfig of a GPTConfig with Llama's options (ArceeConfig with ReLU²); hidden is its MLP's hidden size."""
    from transformers import ArceeConfig, LlamaConfig
    relu2 = config.mlp == 'relu2'
    llama = (ArceeConfig if relu2 else LlamaConfig)(
        vocab_size=vocab_size, hidden_size=config.n_embd, intermediate_size=hidden, num_hidden_layers=config.n_layer,
        num_attention_heads=config.n_head, num_key_value_heads=config.n_head, max_position_embeddings=config.block_size,
        rms_norm_eps=1e-5, rope_parameters={'rope_type': 'default', 'rope_theta': config.rope_theta},
        tie_word_embeddings=config.tie_embeddings, attention_bias=config.bias, mlp_bias=config.bias,
        attention_dropout=config.attention_dropout(), hidden_act='relu2' if relu2 else 'silu', bos_token_id=eot_token,
        eos_token_id=eot_token, architectures=['ArceeForCausalLM' if relu2 else 'LlamaForCausalLM'])
    llama.rope_theta = config.rope_theta  # where transformers 4 and llama.cpp's converter read it
    return llama


def llama_weights(model, vocab_size):
    """model.py's GPT (Llama's options) as LlamaForCausalLM (or ArceeForCausalLM) names its weights,
    keeping the first vocab_size tokens: c_attn's rows are q, k, v in turn, and SwiGLU's c_fc rows are
    gate then up (ReLU²'s c_fc is up alone)."""
    cfg, t = model.config, model.transformer
    hidden = t.h[0].mlp.hidden
    weights = {'model.embed_tokens.weight': t.wte.weight[:vocab_size], 'model.norm.weight': t.ln_f.weight,
               'lm_head.weight': model.lm_head.weight[:vocab_size]}
    for i, block in enumerate(t.h):
        attn, mlp, layer = block.attn, block.mlp, f'model.layers.{i}.'
        for kind in ('weight', 'bias') if cfg.bias else ('weight',):
            q, k, v = getattr(attn.c_attn, kind).split(cfg.n_embd)
            gate, up = (None, getattr(mlp.c_fc, kind)) if cfg.mlp == 'relu2' else getattr(mlp.c_fc, kind).split(hidden)
            weights.update({
                layer + f'self_attn.q_proj.{kind}': q,
                layer + f'self_attn.k_proj.{kind}': k,
                layer + f'self_attn.v_proj.{kind}': v,
                layer + f'self_attn.o_proj.{kind}': getattr(attn.c_proj, kind),
                layer + f'mlp.up_proj.{kind}': up,
                layer + f'mlp.down_proj.{kind}': getattr(mlp.c_proj, kind),
            })
            if gate is not None:
                weights[layer + f'mlp.gate_proj.{kind}'] = gate
        weights[layer + 'input_layernorm.weight'] = block.ln_1.weight
        weights[layer + 'post_attention_layernorm.weight'] = block.ln_2.weight
    return {k: v.detach() for k, v in weights.items()}


def to_llama(model):
    """The LlamaForCausalLM (ArceeForCausalLM) that computes what model.py's GPT with Llama's options computes."""
    import transformers
    cfg = model.config
    config = llama_config(cfg, model.transformer.h[0].mlp.hidden, cfg.vocab_size)
    llama = getattr(transformers, config.architectures[0])(config)  # the class llama_config names
    llama.load_state_dict({k: v.clone() for k, v in llama_weights(model, cfg.vocab_size).items()}, strict=True)
    return llama.eval()


def save_llama(model, folder, vocab_size, eot_token):
    """model.py's GPT with Llama's options as folder/model.safetensors, config.json and
    generation_config.json for LlamaForCausalLM (ArceeForCausalLM), keeping the first vocab_size tokens."""
    weights = llama_weights(model, vocab_size)
    if model.config.tie_embeddings:  # one tensor in the file; transformers ties lm_head to it
        del weights['lm_head.weight']
    save_weights(weights, folder)
    llama_config(model.config, model.transformer.h[0].mlp.hidden, vocab_size, eot_token).save_pretrained(folder)
    save_generation_config(folder, eot_token)


def save_weights(state, folder):
    from safetensors import SafetensorError
    from safetensors.torch import save_file
    try:  # float32 copies of their own: safetensors refuses tensors that share memory (views, tied weights)
        save_file({k: v.float().clone().contiguous() for k, v in state.items()},
                  os.path.join(folder, 'model.safetensors'), metadata={'format': 'pt'})
    except SafetensorError as e:  # how it reports the OS's errors too, a full disk among them
        raise OSError(str(e)) from e


def save_generation_config(folder, eot_token):
    from transformers import GenerationConfig
    # pad_token_id too: generate() would otherwise warn and pick the eos token itself
    GenerationConfig(bos_token_id=eot_token, eos_token_id=eot_token, pad_token_id=eot_token).save_pretrained(folder)


def save_tokenizer(state, enc, folder, max_length):
    """The checkpoint's tokenizer (its state, and enc, its Encoding) as tokenizer.json and
    tokenizer_config.json: a trained BPE's file as it is (a `tokenizers` file with a ByteLevel
    pre-tokenizer and decoder), GPT-2's built from tiktoken's ranks."""
    text = gpt2_tokenizer_json(enc) if state['name'] == 'gpt2' else state['json']
    with open(os.path.join(folder, 'tokenizer.json'), 'w', encoding='utf-8') as f:
        f.write(text)
    # written by hand: save_pretrained in transformers 5 names a class that 4.x lacks
    config = {'tokenizer_class': 'PreTrainedTokenizerFast', 'bos_token': EOT, 'eos_token': EOT, 'unk_token': EOT,
              'pad_token': EOT, 'model_max_length': max_length, 'add_prefix_space': False,
              'clean_up_tokenization_spaces': False}  # decode(encode(text)) == text
    with open(os.path.join(folder, 'tokenizer_config.json'), 'w') as f:
        json.dump(config, f, indent=2)


def gpt2_tokenizer_json(enc):
    """GPT-2's tokenizer.json, built from tiktoken's Encoding (enc) exactly as transformers'
    TikTokenConverter builds it. The converter reads the ranks from a file through tiktoken's
    loader, which caches every path it reads: each export would leave a copy in the user's cache."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    ranks = enc._mergeable_ranks
    char = {b: c for c, b in byte_of_char().items()}
    text = lambda token: ''.join(char[b] for b in token)
    # every way to split a token into two tokens is a merge, ranked by the token, then by its halves
    merges = sorted(((token[:i], token[i:]) for token in ranks for i in range(1, len(token))
                     if token[:i] in ranks and token[i:] in ranks),
                    key=lambda pair: (ranks[pair[0] + pair[1]], ranks[pair[0]], ranks[pair[1]]))
    bpe = Tokenizer(models.BPE({text(t): r for t, r in ranks.items()}, [(text(a), text(b)) for a, b in merges],
                               fuse_unk=False, ignore_merges=True))  # a whole word in the vocabulary is one token
    bpe.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(enc._pat_str), behavior='isolated'),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    bpe.decoder = decoders.ByteLevel()
    bpe.post_processor = processors.ByteLevel(trim_offsets=False)
    bpe.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in enc._special_tokens])
    return bpe.to_str(pretty=True)


def from_pretrained(name_or_path, meta, block_size, dropout, tokenizer):
    """model_args and model.py's state_dict for a transformers model, to fine-tune on meta's data
    (made by `tokenizer`, a tokenizer state): OpenAI's GPT-2 by name (gpt2,
    gpt2-medium, gpt2-large, gpt2-xl: from the local Hugging Face cache, else the hub), or a folder
    holding a GPT-2, a Llama or an Arcee as export.py writes them; its context cropped to block_size."""
    from model import GPT, GPTConfig
    if os.path.isdir(name_or_path) and not os.path.isfile(os.path.join(name_or_path, 'config.json')):
        die(f"init_from={name_or_path} is a folder without a transformers model (no config.json): give a checkpoint "
            f"file such as {os.path.join(name_or_path, 'best.pt')}, or a folder export.py wrote")
    check_tokenizer(name_or_path, meta, tokenizer)
    from transformers import ArceeForCausalLM, AutoConfig, GPT2LMHeadModel, LlamaForCausalLM
    try:
        config = cached_or_hub(name_or_path, lambda **kw: AutoConfig.from_pretrained(name_or_path, **kw))
    except (OSError, ValueError) as e:
        die(f"cannot read the transformers model {name_or_path}: {str(e).splitlines()[0]}")
    classes = {'gpt2': GPT2LMHeadModel, 'llama': LlamaForCausalLM, 'arcee': ArceeForCausalLM}
    if config.model_type not in classes:
        die(f"init_from={name_or_path} holds a {config.model_type} model; model.py's GPT reads GPT-2, Llama and "
            "Arcee models (all that export.py writes)")
    gpt2 = config.model_type == 'gpt2'
    args = dict(n_layer=config.num_hidden_layers, n_head=config.num_attention_heads, n_embd=config.hidden_size,
                block_size=block_size, vocab_size=config.vocab_size, dropout=dropout,
                tie_embeddings=config.tie_word_embeddings)
    if gpt2:
        args['bias'] = True  # GPT-2 always has biases; a bias-free model's export holds zeros
        differ = [(f'n_inner={config.n_inner}', config.n_inner in (None, 4 * config.n_embd)),
                  (f'scale_attn_weights={config.scale_attn_weights}', config.scale_attn_weights),
                  (f'scale_attn_by_inverse_layer_idx={config.scale_attn_by_inverse_layer_idx}',
                   not config.scale_attn_by_inverse_layer_idx),
                  (f'activation_function={config.activation_function!r}',
                   config.activation_function in ('gelu', 'gelu_new', 'gelu_pytorch_tanh'))]
    else:
        # transformers 5 keeps the rotary settings in rope_parameters, 4.x in rope_theta and rope_scaling
        rope = getattr(config, 'rope_parameters', None) or {
            'rope_theta': config.rope_theta, 'rope_type': (config.rope_scaling or {}).get('rope_type', 'default')}
        relu2 = config.model_type == 'arcee'
        args.update(ARCEE_SHAPE if relu2 else LLAMA_SHAPE, bias=config.attention_bias, rope_theta=rope['rope_theta'])
        head_dim = getattr(config, 'head_dim', None)
        differ = [(f'num_key_value_heads={config.num_key_value_heads}',
                   config.num_key_value_heads in (None, config.num_attention_heads)),
                  (f'head_dim={head_dim}', head_dim in (None, config.hidden_size // config.num_attention_heads)),
                  (f"rope_type={rope.get('rope_type')!r}", rope.get('rope_type', 'default') == 'default'),
                  (f'hidden_act={config.hidden_act!r}', config.hidden_act == ('relu2' if relu2 else 'silu')),
                  (f'mlp_bias={config.mlp_bias} with attention_bias={config.attention_bias}',
                   config.mlp_bias == config.attention_bias)]
    eps = config.layer_norm_epsilon if gpt2 else config.rms_norm_eps
    differ = [text for text, ok in differ + [(f'eps={eps}', eps == 1e-5)] if not ok]
    if not gpt2 and not differ:
        try:
            model = GPT(GPTConfig(**args))
        except ValueError as e:
            die(f"init_from={name_or_path} does not fit model.py's GPT: {e}")
        if config.intermediate_size != model.transformer.h[0].mlp.hidden:  # model.py sizes its MLP itself
            differ.append(f'intermediate_size={config.intermediate_size}')
    if differ:
        die(f"init_from={name_or_path} has {', '.join(differ)}, which model.py's GPT does not implement")
    if gpt2 and config.activation_function != 'gelu':
        log(f"note: {name_or_path} was trained with the tanh approximation of GELU, model.py uses the exact one "
            "(activations differ by at most 5e-4, as in nanoGPT)")
    if block_size > config.max_position_embeddings:
        die(f"{name_or_path} has a context of {config.max_position_embeddings} tokens: "
            f"use --block_size={config.max_position_embeddings} or less")
    if meta['vocab_size'] > config.vocab_size:
        die(f"the data's vocabulary ({meta['vocab_size']} tokens) is larger than that of {name_or_path} ({config.vocab_size})")
    hf_model = load_weights(name_or_path, classes[config.model_type], config)
    if gpt2:
        state = transposed({k: v.float() for k, v in hf_model.state_dict().items()})
        state['transformer.wpe.weight'] = state['transformer.wpe.weight'][:block_size]
        state['lm_head.weight'] = hf_model.lm_head.weight.float()
        return args, state
    with torch.no_grad():  # llama_weights' tensors are views into the model's: the mapping, read backwards
        hf_state = hf_model.state_dict()
        for name, view in llama_weights(model, config.vocab_size).items():
            view.copy_(hf_state[name])
    return args, model.state_dict()


def check_tokenizer(name_or_path, meta, tokenizer):
    """End the run unless meta's data was made by the tokenizer of the model at name_or_path: GPT-2's,
    or a trained BPE's tokenizer.json that export.py copied into the folder, which must be the data's
    (tokenizer, its state)."""
    if meta.get('tokenizer', 'gpt2') == 'gpt2':
        return
    path = os.path.join(name_or_path, 'tokenizer.json')
    if not os.path.isfile(path):
        die(f"init_from={name_or_path} needs data prepared with the GPT-2 tokenizer, and this data's is "
            f"{meta['tokenizer']!r}: run prepare.py with tokenizer=gpt2 into another --data_dir")
    with open(path, encoding='utf-8') as f:
        if f.read() != tokenizer['json']:
            die(f"init_from={name_or_path} has another tokenizer (its tokenizer.json) than the {meta['tokenizer']} "
                "that made the data: prepare the data as that model's was, with the same --tokenizer and train documents")


def cached_or_hub(name_or_path, load):
    """load(local_files_only=True), which reads a folder, or a model from the local Hugging Face cache;
    on a cache miss, unless offline mode is on, load() from the hub once it answers a first request
    (unreachable, the hub's client would retry for ~30 s)."""
    from huggingface_hub import constants, model_info
    try:
        return load(local_files_only=True)
    except OSError:
        if os.path.isdir(name_or_path):
            raise
    why = 'HF_HUB_OFFLINE=1' if constants.HF_HUB_OFFLINE else None
    if not why:
        try:
            model_info(name_or_path, timeout=10)
        except Exception as e:  # the HTTP client's own errors, which differ between huggingface_hub versions
            why = f"{type(e).__name__}: {e}".splitlines()[0]
    if why:
        die(f"{name_or_path} is not in the local Hugging Face cache and the hub cannot be reached ({why}): "
            "download it once online, or give the path of a folder holding it")
    return load()


def load_weights(name_or_path, cls, config):
    """The transformers model cls with config and the weights at name_or_path, or one line saying why not."""
    from safetensors import SafetensorError
    from transformers.utils.logging import disable_progress_bar
    disable_progress_bar()  # train.py has its own
    try:
        return cached_or_hub(name_or_path, lambda **kw: cls.from_pretrained(name_or_path, config=config, **kw))
    except pickle.UnpicklingError:  # torch.load(weights_only=True) met more than tensors, and ran none of it
        die(f"{name_or_path} holds its weights in a pickle (pytorch_model.bin) that holds more than tensors and could "
            "run code when loaded: refused; use a folder with model.safetensors, such as one export.py wrote")
    except (OSError, RuntimeError, ValueError, SafetensorError) as e:
        die(f"cannot load the weights of {name_or_path}: {str(e).splitlines()[0]}")

