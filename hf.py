"""The mapping between model.py's GPT and transformers' models, both ways: parameter names,
the transposed Conv1D weights, configs, and GPT-2's tokenizer files built from tiktoken's data.
export.py writes a transformers folder with it; train.py's init_from='gpt2' reads one.
transformers, tokenizers and safetensors are imported inside the functions: only these two
paths need them."""
import base64
import json
import os
import tempfile

import torch

from common import die, log

# GPT-2 keeps these in Conv1D modules, which store the weight as (in, out): nn.Linear's transpose
CONV1D = ('attn.c_attn.weight', 'attn.c_proj.weight', 'mlp.c_fc.weight', 'mlp.c_proj.weight')
# model_args that only size the model; every other option must keep GPTConfig's default (GPT-2's
# own choice) to fit GPT2LMHeadModel, except bias=False, exported as zero biases
SIZES = ('n_layer', 'n_head', 'n_embd', 'block_size', 'vocab_size', 'dropout')
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
    defaults = GPTConfig()
    differ = {k: v for k, v in model_args.items() if k not in SIZES + ('bias',) and v != getattr(defaults, k, None)}
    if not differ:
        return 'GPT2LMHeadModel'
    # LlamaForCausalLM goes here once model.py has its options: rotary positions, RMSNorm, SwiGLU, no biases
    die(f"{', '.join(f'{k}={v!r}' for k, v in differ.items())}: "
        f"{'this option has' if len(differ) == 1 else 'these options have'} no counterpart in GPT2LMHeadModel, "
        "the one transformers model export.py writes so far")


def save_gpt2(model, folder, vocab_size, eot_token):
    """model.py's GPT as folder/model.safetensors, config.json and generation_config.json for
    GPT2LMHeadModel, keeping the first vocab_size tokens (the rest pad the vocabulary for speed)."""
    from safetensors.torch import save_file
    from transformers import GenerationConfig, GPT2Config
    cfg = model.config
    state = transposed(model.state_dict())
    state['transformer.wte.weight'] = state['transformer.wte.weight'][:vocab_size].contiguous()
    if not cfg.bias:  # GPT-2 always has biases; zeros compute exactly what the bias-free model does
        for k, v in list(state.items()):
            if k.endswith(('ln_1.weight', 'ln_2.weight', 'ln_f.weight') + CONV1D):
                state[k[:-len('weight')] + 'bias'] = torch.zeros(v.size(-1), dtype=v.dtype)
    save_file({k: v.float() for k, v in state.items()}, os.path.join(folder, 'model.safetensors'),
              metadata={'format': 'pt'})
    GPT2Config(vocab_size=vocab_size, n_positions=cfg.block_size, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
               n_head=cfg.n_head, activation_function='gelu',  # model.py's exact GELU, not GPT-2's tanh one
               resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout, layer_norm_epsilon=1e-5,
               bos_token_id=eot_token, eos_token_id=eot_token, tie_word_embeddings=True,
               architectures=['GPT2LMHeadModel']).save_pretrained(folder)
    # pad_token_id too: generate() would otherwise warn and pick the eos token itself
    GenerationConfig(bos_token_id=eot_token, eos_token_id=eot_token, pad_token_id=eot_token).save_pretrained(folder)


def save_gpt2_tokenizer(enc, folder, max_length):
    """tiktoken's GPT-2 encoding as tokenizer.json and tokenizer_config.json, converted by
    transformers' TikTokenConverter from a file in tiktoken's own format."""
    from tokenizers import AddedToken
    from transformers.convert_slow_tokenizer import TikTokenConverter
    with tempfile.TemporaryDirectory() as tmp:
        ranks = os.path.join(tmp, 'gpt2.tiktoken')
        with open(ranks, 'wb') as f:  # what tiktoken.load.dump_tiktoken_bpe writes, without needing blobfile
            for token, rank in sorted(enc._mergeable_ranks.items(), key=lambda item: item[1]):
                f.write(base64.b64encode(token) + b' ' + str(rank).encode() + b'\n')
        tokenizer = TikTokenConverter(vocab_file=ranks, pattern=enc._pat_str).converted()
    # added here, not by the converter: its argument for them has changed names across versions
    tokenizer.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in enc._special_tokens])
    tokenizer.save(os.path.join(folder, 'tokenizer.json'))
    # written by hand: save_pretrained in transformers 5 names a class that 4.x lacks
    config = {'tokenizer_class': 'PreTrainedTokenizerFast', 'bos_token': EOT, 'eos_token': EOT, 'unk_token': EOT,
              'model_max_length': max_length, 'add_prefix_space': False,
              'clean_up_tokenization_spaces': False}  # decode(encode(text)) == text
    with open(os.path.join(folder, 'tokenizer_config.json'), 'w') as f:
        json.dump(config, f, indent=2)


def gpt2_from_pretrained(name_or_path, meta, block_size, dropout):
    """model_args and model.py's state_dict for a transformers GPT-2: OpenAI's by name (gpt2,
    gpt2-medium, gpt2-large, gpt2-xl: from the local Hugging Face cache, else the hub) or a local
    folder, its context cropped to block_size, to fine-tune on meta's data."""
    where = 'folder' if os.path.isdir(name_or_path) else 'model'
    if meta.get('tokenizer', 'gpt2') != 'gpt2':
        die(f"init_from={name_or_path} needs data prepared with the GPT-2 tokenizer, and this data's is "
            f"{meta['tokenizer']!r}: run prepare.py with tokenizer=gpt2 into another --data_dir")
    if where == 'folder' and not os.path.isfile(os.path.join(name_or_path, 'config.json')):
        die(f"init_from={name_or_path} is a folder without a transformers model (no config.json): give a checkpoint "
            f"file such as {os.path.join(name_or_path, 'best.pt')}, or a folder export.py wrote")
    from transformers import AutoConfig, GPT2LMHeadModel
    from transformers.utils.logging import disable_progress_bar
    try:
        config = AutoConfig.from_pretrained(name_or_path)
    except (OSError, ValueError) as e:
        if where == 'folder':
            die(f"cannot read a transformers model from the folder {name_or_path}: {str(e).splitlines()[0]}")
        die(f"{name_or_path} is not in the local Hugging Face cache and the hub cannot be reached"
            f"{' (HF_HUB_OFFLINE=1)' if os.environ.get('HF_HUB_OFFLINE') == '1' else ''}: "
            "download it once online, or give the path of a folder holding it")
    if config.model_type != 'gpt2':
        die(f"init_from={name_or_path} holds a {config.model_type} model; only GPT-2 models map to model.py")
    n_embd = config.n_embd
    differ = [f"{k}={getattr(config, k)!r}" for k, ok in (
        ('n_inner', config.n_inner in (None, 4 * n_embd)), ('layer_norm_epsilon', config.layer_norm_epsilon == 1e-5),
        ('tie_word_embeddings', config.tie_word_embeddings), ('scale_attn_weights', config.scale_attn_weights),
        ('scale_attn_by_inverse_layer_idx', not config.scale_attn_by_inverse_layer_idx),
        ('activation_function', config.activation_function in ('gelu', 'gelu_new', 'gelu_pytorch_tanh')))
        if not ok]
    if differ:
        die(f"init_from={name_or_path} has {', '.join(differ)}, which model.py's GPT does not implement")
    if config.activation_function != 'gelu':
        log(f"note: {name_or_path} was trained with the tanh approximation of GELU, model.py uses the exact one "
            "(activations differ by at most 5e-4, as in nanoGPT)")
    if block_size > config.n_positions:
        die(f"{name_or_path} has a context of {config.n_positions} tokens: use --block_size={config.n_positions} or less")
    if meta['vocab_size'] > config.vocab_size:
        die(f"the data's vocabulary ({meta['vocab_size']} tokens) is larger than that of {name_or_path} ({config.vocab_size})")
    disable_progress_bar()  # train.py has its own
    try:
        hf_model = GPT2LMHeadModel.from_pretrained(name_or_path, config=config)
    except OSError as e:
        die(f"cannot load the weights of {name_or_path}: {str(e).splitlines()[0]}")
    state = transposed({k: v.float() for k, v in hf_model.state_dict().items()})
    state['transformer.wpe.weight'] = state['transformer.wpe.weight'][:block_size]
    state['lm_head.weight'] = state['transformer.wte.weight']
    model_args = dict(n_layer=config.n_layer, n_head=config.n_head, n_embd=n_embd, block_size=block_size,
                      bias=True, vocab_size=config.vocab_size, dropout=dropout)
    return model_args, state

