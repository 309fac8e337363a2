import os
import re
import shutil
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(ROOT), 'shared')
TINYSTORIES = os.path.join(SHARED, 'data', 'tinystories')
TIKTOKEN_CACHE = os.path.join(SHARED, 'tiktoken-cache')

sys.path.insert(0, ROOT)
# Never wait ~25 s for an unreachable hub; find tiktoken's GPT-2 files offline.
os.environ.setdefault('HF_DATASETS_OFFLINE', '1')
os.environ.setdefault('HF_HUB_OFFLINE', '1')
if os.path.isdir(TIKTOKEN_CACHE):
    os.environ.setdefault('TIKTOKEN_CACHE_DIR', TIKTOKEN_CACHE)

needs_shared = pytest.mark.skipif(not os.path.isdir(TINYSTORIES), reason=f'{TINYSTORIES} is absent')
needs_tokenizer = pytest.mark.skipif(not os.path.isdir(TIKTOKEN_CACHE) and 'TIKTOKEN_CACHE_DIR' not in os.environ,
                                     reason='no offline tiktoken cache (../shared/tiktoken-cache)')


def write_data(data_dir, state, stories, repeats=40, validation=None):
    """data_dir as prepare.py lays it out, in the tokens of the tokenizer `state` describes: the stories,
    each after <|endoftext|>, `repeats` times over, as the train split, and as the validation split too
    unless other stories are given for it. Returns the tokenizer."""
    import json
    import numpy as np
    import tokenizer
    enc = tokenizer.get_tokenizer(state)
    os.makedirs(data_dir)
    if state['json']:
        with open(os.path.join(data_dir, 'tokenizer.json'), 'w', encoding='utf-8') as f:
            f.write(state['json'])
    meta = tokenizer.meta_fields(enc)
    for split, docs in (('train', stories * repeats), ('validation', validation or stories * repeats)):
        tokens = np.array([t for s in docs for t in [enc.eot_token] + enc.encode_ordinary(s)], dtype=np.uint16)
        tokens.tofile(os.path.join(data_dir, f'{split}.bin'))
        meta[split] = {'tokens': len(tokens), 'documents': len(docs)}
    with open(os.path.join(data_dir, 'meta.json'), 'w') as f:
        json.dump(meta, f)
    return enc


def put_where_the_hint_trains(error, checkpoint):
    """Copy checkpoint to the out_dir (under the working directory) of the config that error's hint
    trains ("train one first: python train.py CONFIG")."""
    command = re.search(r'train one first: python train.py (\S+)\)', str(error))
    assert command, error
    settings = {}
    exec(open(os.path.join(ROOT, command[1])).read(), {}, settings)
    os.makedirs(settings['out_dir'])
    shutil.copy(checkpoint, settings['out_dir'])
