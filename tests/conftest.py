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


def put_where_the_hint_trains(error, checkpoint):
    """Copy checkpoint to the out_dir (under the working directory) of the config that error's hint
    trains ("train one first: python train.py CONFIG")."""
    command = re.search(r'train one first: python train.py (\S+)\)', str(error))
    assert command, error
    settings = {}
    exec(open(os.path.join(ROOT, command[1])).read(), {}, settings)
    os.makedirs(settings['out_dir'])
    shutil.copy(checkpoint, settings['out_dir'])
