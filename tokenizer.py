"""
The tokenizer, of either kind, in one place:
  'gpt2'   tiktoken's GPT-2 BPE (50,257 tokens), for GPT-2 weights and tools that expect its ids.
  'bpe:N'  a byte-level BPE of N tokens trained on the train documents by Hugging Face `tokenizers`
           and written to data_dir/tokenizer.json; small vocabularies suit small models and CPUs.
Either way the scripts get an object with tiktoken's Encoding interface (name, n_vocab, eot_token,
encode_ordinary, encode, decode, decode_single_token_bytes), and never ask which kind it is. A
tokenizer's state, {'name': 'gpt2' or 'bpe:N', 'json': None or the tokenizer.json text}, is what
train.py stores in every checkpoint under 'tokenizer' and what two tokenizers compare by.
"""
import codecs
import json
import os
import re

from common import die, log

EOT = '<|endoftext|>'
GPT2 = {'name': 'gpt2', 'json': None}  # also the tokenizer of checkpoints and meta.json that name none
MIN_BPE, MAX_BPE = 257, 65535  # the 256 bytes and <|endoftext|>; ids that fit uint16
# GPT-2's split into words, the one the ByteLevel pre-tokenizer applies (use_regex=True)
SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# The BPE trainer's time grows with the square of a word's length: 68 s for one word of 400K letters
# (or digits, or spaces, or '='), hours for 5 MB. So it trains on words cut at MAX_WORD characters,
# longer than any in prose; encoding needs no cut (tiktoken's time is linear in a word's length)
MAX_WORD = 256


def parse_name(name):
    """N for 'bpe:N', 0 for 'gpt2'; anything else ends the run."""
    m = re.fullmatch(r'bpe:(\d+)', str(name))
    if name != 'gpt2' and not (m and MIN_BPE <= int(m[1]) <= MAX_BPE):
        die(f"tokenizer={name} is not gpt2, bpe:N with N from {MIN_BPE} to {MAX_BPE} (e.g. --tokenizer=bpe:4096), "
            "a checkpoint or a prepared data_dir")
    return int(m[1]) if m else 0


def token_dtype(vocab_size):
    """The smallest unsigned numpy dtype (by name) that holds every token id."""
    return 'uint16' if vocab_size <= 2**16 else 'uint32'


def train_bpe(texts, vocab_size):
    """The tokenizer.json text of a byte-level BPE with vocab_size tokens trained on texts (any
    iterable of str). It streams: memory holds the count of each distinct word, not the text. The
    same texts give the same bytes. Texts with too few distinct pairs of tokens give fewer tokens."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    bpe = Tokenizer(models.BPE())
    # no normalizer and no prefix space, so every byte of a text is kept and decodes back exactly
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    # to train: byte_level's split into words (SPLIT), with MAX_WORD characters at most in a word
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT.replace('+', f'{{1,{MAX_WORD}}}')), behavior='isolated'),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    bpe.decoder = decoders.ByteLevel()  # for Hugging Face tools reading the file; decode() below needs none
    # all 256 bytes are tokens, seen in the texts or not, so any text encodes
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 1, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    bpe.train_from_iterator(texts, trainer)
    bpe.pre_tokenizer = byte_level  # the file's, as in files written before: words whole, as bpe_encoding splits
    bpe.add_special_tokens([EOT])  # the last id, as in GPT-2
    return bpe.to_str()


def byte_of_char():
    """The byte each ByteLevel character stands for (GPT-2's bytes_to_unicode, inverted): printable
    bytes stand for themselves, the others for chr(256), chr(257), ... in order."""
    printable = [*range(ord('!'), ord('~') + 1), *range(ord('¡'), ord('¬') + 1), *range(ord('®'), ord('ÿ') + 1)]
    others = [b for b in range(256) if b not in printable]
    return {chr(b): b for b in printable} | {chr(256 + i): b for i, b in enumerate(others)}


def bpe_encoding(text):
    """A tiktoken Encoding over the tokens of a tokenizer.json that train_bpe wrote. tiktoken's BPE
    merges by the rank of the merged token, which is its id here (ids follow the merge order), so it
    splits as `tokenizers` does (tests check every story of the samples), several times faster and
    without holding the GIL, so prepare.py's threads encode in parallel."""
    import tiktoken
    spec = json.loads(text)
    byte_of = byte_of_char()
    ranks = {bytes(byte_of[c] for c in token): i for token, i in spec['model']['vocab'].items()}
    special = {t['content']: t['id'] for t in spec['added_tokens']}
    if list(special) != [EOT]:
        raise ValueError(f"its special tokens are {list(special)}, not just {EOT}")
    return tiktoken.Encoding(f'bpe:{len(ranks) + len(special)}', pat_str=SPLIT, mergeable_ranks=ranks,
                             special_tokens=special)


def get_tokenizer(state=GPT2):
    """The tokenizer that a state describes, with tiktoken's Encoding interface."""
    if state['name'] == 'gpt2':
        import tiktoken
        try:
            return tiktoken.get_encoding('gpt2')
        except Exception as e:
            die(f"cannot load the GPT-2 tokenizer ({type(e).__name__}); offline, set "
                "TIKTOKEN_CACHE_DIR to a folder holding tiktoken's gpt2 files, e.g. "
                "export TIKTOKEN_CACHE_DIR=$PWD/../shared/tiktoken-cache")
    try:
        return bpe_encoding(state['json'])
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        die(f"the tokenizer.json of {state['name']} is not one that prepare.py wrote ({type(e).__name__}: {e})")


def dropout_tokenizer(state, p):
    """A `tokenizers` Tokenizer of a BPE's state that skips each merge with probability p (BPE-dropout,
    Provilkov et al. 2020): each encode splits the text anew. Text that reads <|endoftext|> stays text,
    as tiktoken's encode_ordinary keeps it."""
    from tokenizers import Tokenizer
    bpe = Tokenizer.from_str(state['json'])
    bpe.model.dropout = p
    bpe.encode_special_tokens = True
    return bpe


def token_bytes(enc):
    """Each token's length in UTF-8 bytes (a numpy array), for bits per byte: they add up to the decoded
    text's length whatever the tokenizer (a token may hold part of a character, the next one the rest).
    <|endoftext|> has none: it marks where a story ends, it is not text."""
    import numpy as np
    sizes = np.array([len(enc.decode_single_token_bytes(t)) for t in range(enc.n_vocab)], dtype=np.int64)
    sizes[enc.eot_token] = 0
    return sizes

def train_tokenizer(name, texts):
    """For prepare.py: the state of the tokenizer `name` names, for 'bpe:N' trained on texts (the
    train documents only, an iterable read once)."""
    n = parse_name(name)
    if not n:
        return GPT2
    text = train_bpe(texts, n)
    trained = f"bpe:{len(json.loads(text)['model']['vocab']) + 1}"
    if trained != name:
        log(f"note: the train documents hold too few distinct pairs of tokens for {name}: trained {trained}")
    return {'name': trained, 'json': text}


def reused_tokenizer(path):
    """For prepare.py: the state of the tokenizer of a checkpoint file or a prepared data_dir, to
    prepare new data in the tokens a model already reads (to fine-tune it on them)."""
    from common import load_checkpoint, read_meta
    if os.path.isdir(path):
        return data_tokenizer(path, read_meta(path))
    return checkpoint_tokenizer(load_checkpoint(path))


def meta_fields(enc):
    """What meta.json records about the tokenizer of its .bin files."""
    return {'tokenizer': enc.name, 'vocab_size': enc.n_vocab, 'eot_token': enc.eot_token, 'dtype': token_dtype(enc.n_vocab)}


def data_tokenizer(data_dir, meta):
    """The state of the tokenizer that made data_dir's tokens (meta is its meta.json, as read_meta
    returns it); a meta.json that names none is from before bpe, hence GPT-2."""
    name = meta.get('tokenizer', 'gpt2')
    again = "run prepare.py again with --force=True"
    if name == 'gpt2':
        return GPT2
    if not re.fullmatch(r'bpe:\d+', str(name)):
        die(f"{data_dir}/meta.json names tokenizer {name!r}, neither gpt2 nor bpe:N: {again}")
    path = os.path.join(data_dir, 'tokenizer.json')
    try:
        with open(path, encoding='utf-8') as f:
            state = {'name': name, 'json': f.read()}
    except OSError as e:
        die(f"{data_dir}/meta.json names tokenizer {name}, but {path} is unreadable ({e.strerror or e}): {again}")
    enc = get_tokenizer(state)
    if (enc.name, enc.n_vocab, enc.eot_token) != (name, meta.get('vocab_size'), meta.get('eot_token')):
        die(f"{path} holds {enc.name} with <|endoftext|> at {enc.eot_token}, not what {data_dir}/meta.json says: {again}")
    return state


def checkpoint_tokenizer(ckpt):
    """The state of the tokenizer a checkpoint was trained with; checkpoints from before bpe, and
    nanoGPT's, name none and mean GPT-2."""
    state = ckpt.get('tokenizer', GPT2)
    if not (isinstance(state, dict) and state.keys() == GPT2.keys() and isinstance(state['name'], str)
            and (state['json'] is None) == (state['name'] == 'gpt2')):
        die("the checkpoint's 'tokenizer' is not {'name': 'gpt2' or 'bpe:N', 'json': None or tokenizer.json text}")
    return state


def check_same(data_state, ckpt_state, data_dir, ckpt_path):
    """End the run unless data_dir's tokens were made by the tokenizer the checkpoint knows."""
    if data_state == ckpt_state:
        return
    ours = ckpt_state['name']
    if ours == data_state['name']:
        ours = f"another {ours}, trained on other documents"
    die(f"{data_dir} was prepared with tokenizer {data_state['name']}, but {ckpt_path} was trained with {ours}: "
        "use data prepared with the checkpoint's tokenizer (a bpe:N is the same one only when trained on the same "
        "train documents)")


def prompt_ids(enc, text):
    """The ids a story's beginning is read as: every story in train.bin follows an <|endoftext|>, which
    tells the model a new story begins (sample.py, serve.py and llama.cpp's GGUF alike)."""
    return [enc.eot_token] + enc.encode(text, allowed_special='all')


class TextDecoder:
    """The text of token ids as they come, in whole characters: a token, of GPT-2 or of a byte-level
    BPE, can end inside a multi-byte UTF-8 character that the next token completes. Joined, the
    pieces equal enc.decode(ids); bytes that never form a character become U+FFFD. Ids past the
    tokenizer's (a vocabulary padded for speed) have no text, nor has <|endoftext|> with eot_text=False."""

    def __init__(self, enc, eot_text=True):
        self.enc, self.eot_text = enc, eot_text
        self.decoder = codecs.getincrementaldecoder('utf-8')(errors='replace')

    def add(self, token):
        known = token < self.enc.n_vocab and (self.eot_text or token != self.enc.eot_token)
        return self.decoder.decode(self.enc.decode_single_token_bytes(token) if known else b'')

    def end(self):
        return self.decoder.decode(b'', final=True)


def decode_utf8(tokens, enc):
    """Yield the text of a stream of token ids as soon as it forms whole characters (TextDecoder)."""
    decoder = TextDecoder(enc)
    for text in map(decoder.add, tokens):
        if text:
            yield text
    text = decoder.end()
    if text:
        yield text
