"""Story scores (stories.py, eval.py --stories): each score catches what it claims, on stories written
here; the command line on a tiny untrained model, with a stand-in judge server."""
import http.server
import json
import os
import subprocess
import sys
import threading

import pytest
import sacrebleu
import torch

import stories
from conftest import ROOT, TINYSTORIES, needs_shared, needs_tokenizer, write_data
from model import GPT, GPTConfig

MODEL_ARGS = dict(n_layer=1, n_head=2, n_embd=16, block_size=32, vocab_size=50257)
TRAIN = ['Once upon a time, there was a little girl named Lily. She had a red ball that she loved very much. '
         'Every day she took the ball to the park and played with her friend Tim under the big tree.',
         'Tom was a brave dog. He liked to run in the garden and dig holes near the fence. One day he found an '
         'old bone, and he was so happy that he wagged his tail all afternoon.',
         'The sun was hot, so Mia went to the lake with her mom. They ate sandwiches on a blue blanket and '
         'watched the ducks swim. Mia said, "This is the best day ever!"']
HELD_OUT = ['Ben had a small boat. He pushed it into the pond and watched it float away. His sister helped him '
            'get it back with a long stick, and they laughed together.',
            'A little bird sat on a branch. It sang a song for the flowers below. The flowers danced in the wind '
            'and the bird was glad.']


def test_a_story_copied_from_training_scores_copying_one_and_names_the_story():
    index = stories.CopyIndex(TRAIN, n=8)
    copied = index.copied([TRAIN[1][len('Tom was a brave dog.'):]])
    assert copied['copied_ngrams'] == 1.0
    longest = copied['longest_copy']
    assert longest['story'] == 1 and longest['text'] == 0
    assert longest['from'].startswith('he liked to run in the garden') and longest['from'].endswith('all afternoon')
    assert longest['words'] == len(stories.words(TRAIN[1])) - 5
    # a story of its own copies nothing; one copied sentence inside it is found, with its story
    assert index.copied(HELD_OUT)['copied_ngrams'] == 0.0
    mixed = index.copied([HELD_OUT[0] + ' They ate sandwiches on a blue blanket and watched the ducks swim.'])
    assert 0 < mixed['copied_ngrams'] < 1
    assert mixed['longest_copy']['story'] == 2 and mixed['longest_copy']['words'] == 12


def test_misspelt_words_raise_the_spelling_score_and_the_stories_names_are_words():
    speller = stories.Speller(stories.Speller.names_in(TRAIN + ['Zorbo and Quilla went home. Zorbo smiled.']))
    clean, bad = speller.misspelt(HELD_OUT + ['Lily and Tim played. Mia\'s mom said, "Zorbo, Quilla, come!"'])
    assert clean == 0.0 and bad == []
    share, bad = speller.misspelt(['She liked to comfair the signy dog and aked him to go.'])
    assert share == pytest.approx(3 / 12)
    assert {w for w, _ in bad} == {'comfair', 'signy', 'aked'}
    # a name is a name only capitalised, where the stories write it so
    assert not speller.is_word('zorbo') and speller.is_word('Zorbo')


def test_a_repeated_sentence_raises_repetition():
    once = HELD_OUT[0]
    again = once + ' He pushed it into the pond and watched it float away. He pushed it into the pond and watched it float away.'
    assert stories.repeated([once]) == 0.0
    assert stories.repeated([again]) > 0.3
    # across the stories: the same story twice is less distinct, and its self-BLEU is 100
    assert stories.distinct([once, once], 2) == pytest.approx(stories.distinct([once], 2) / 2)
    assert stories.self_bleu([once, once]) == pytest.approx(100)


def test_self_bleu_is_sacrebleus_corpus_bleu_against_all_the_others():
    texts = TRAIN + HELD_OUT
    others = [[texts[(i + k) % len(texts)] for i in range(len(texts))] for k in range(1, len(texts))]
    assert stories.self_bleu(texts) == pytest.approx(sacrebleu.corpus_bleu(texts, others).score)
    assert stories.bleu(HELD_OUT, HELD_OUT) == pytest.approx(100)


@needs_shared
def test_self_bleu_matches_sacrebleu_on_real_stories():
    with open(os.path.join(TINYSTORIES, 'valid-sample.txt'), encoding='utf-8') as f:
        texts = [d.strip() for d in f.read().split('<|endoftext|>') if d.strip()][:30]
    others = [[texts[(i + k) % len(texts)] for i in range(len(texts))] for k in range(1, len(texts))]
    assert stories.self_bleu(texts) == pytest.approx(sacrebleu.corpus_bleu(texts, others).score)


def test_openings_are_the_first_sentence():
    start, rest = stories.opening('Lily ran home! "Mom," she said. "Look."', None)
    assert (start, rest) == ('Lily ran home!', ' "Mom," she said. "Look."')
    assert stories.sentences('She said, "Hi!" Then she left. And') == ['She said, "Hi!"', 'Then she left.', 'And']
    assert stories.whole_words('The cat sat on the ma') == 'The cat sat on the'


@needs_tokenizer
def test_an_opening_of_n_tokens_ends_at_a_words_end():
    from tokenizer import get_tokenizer
    enc = get_tokenizer()
    text = 'Lily carried a basket of strawberries to her grandmother.'
    for n in range(1, len(enc.encode_ordinary(text)) + 2):
        start, rest = stories.opening(text, enc, n)
        assert start + rest == text and (rest == '' or rest.startswith(' ')), (n, start)


@pytest.mark.skipif(not stories.shutil.which(stories.LINK_PARSER), reason='link-parser (apt-get install link-grammar) is absent')
def test_link_grammar_counts_sentences_it_cannot_parse():
    share, bad = stories.unparsed(['Lily liked to play with her friends in the park. She liked to make it sweet and '
                                   'like its. The cat ran quickly to home the. He said, "I have a red ball."'])
    assert share == 0.5 and bad == ['She liked to make it sweet and like its.', 'The cat ran quickly to home the.']


@pytest.mark.skipif(not stories.shutil.which(stories.LINK_PARSER), reason='link-parser (apt-get install link-grammar) is absent')
def test_link_grammar_reads_an_untrained_models_text():
    # a NUL ended link-parser's line there, and a sentence that begins with % or ! was a comment or a command to it
    share, bad = stories.unparsed(['The cat sat.\x00 lamb%phal ran. %comment here is bad. !batch we did. The dog ran home.'])
    assert share == len(bad) / 5 and 'lamb%phal ran.' in bad and 'The cat sat.' not in bad  # none lost, none in error


def test_without_link_parser_grammar_says_it_is_not_measured(monkeypatch):
    monkeypatch.setattr(stories, 'LINK_PARSER', 'no-such-link-parser')
    share, note = stories.unparsed(['A sentence.'])
    assert share is None and 'not measured' in note


# -----------------------------------------------------------------------------
# eval.py --stories on a tiny untrained model

@pytest.fixture(scope='module')
def setup(tmp_path_factory):
    from tokenizer import GPT2
    root = tmp_path_factory.mktemp('stories')
    data = root / 'data'
    write_data(data, GPT2, TRAIN, repeats=1, validation=HELD_OUT + TRAIN[:1])
    torch.manual_seed(0)
    model = GPT(GPTConfig(**MODEL_ARGS))
    torch.save({'model': model.state_dict(), 'model_args': MODEL_ARGS, 'iter_num': 3, 'config': {'data_dir': str(data)}},
               root / 'best.pt')
    return root


def run_eval(root, *args):
    return subprocess.run([sys.executable, 'eval.py', f'--out_dir={root}', '--device=cpu', '--dtype=float32',
                           '--stories=3', '--max_new_tokens=20', *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


@needs_tokenizer
def test_eval_stories_the_same_seed_gives_the_same_scores(setup, tmp_path):
    results = []
    for i, args in enumerate((['--seed=5'], ['--seed=5', '--story_batch=1'], ['--seed=6'])):
        out = tmp_path / f'{i}.json'
        done = run_eval(setup, *args, f'--json_out={out}', '--grammar=False')
        assert done.returncode == 0, done.stderr
        results.append(json.loads(out.read_text()))
    same, batched_alone, other = results
    assert same['model'] == batched_alone['model'] and same['stories'] == batched_alone['stories']
    assert other['stories'] != same['stories']
    assert [s['opening'] for s in same['stories']] == ['Ben had a small boat.', 'A little bird sat on a branch.',
                                                      'Once upon a time, there was a little girl named Lily.']
    ref = same['reference']
    # the real third story is a training story: its continuation is copied whole, and named
    assert ref['longest_copy']['story'] == 0 and ref['longest_copy']['text'] == 2
    assert ref['misspelt'] == 0.0 and 'bleu' not in ref and 0 <= same['model']['bleu'] <= 100
    assert 'model' in done.stdout and 'reference' in done.stdout


@needs_tokenizer
@pytest.mark.parametrize('arg, message', [('--stories=-1', 'stories must be >= 0'),
                                          ('--max_new_tokens=0', 'max_new_tokens must be at least 1'),
                                          ('--temperature=-1', 'temperature must be >= 0'),
                                          ('--judge_url=localhost:1', 'judge_url must be an http')])
def test_bad_settings_are_one_error_line(setup, arg, message):
    done = run_eval(setup, arg)
    assert done.returncode != 0
    said = [line for line in done.stderr.splitlines() if not line.startswith('config: ')]  # the settings echoed
    assert len(said) == 1 and said[0].startswith('error: ') and message in said[0], done.stderr


class Judge(http.server.BaseHTTPRequestHandler):
    """A stand-in for an OpenAI-compatible chat endpoint: its answers alternate between the form asked
    for and free text, and it remembers the requests."""
    answers = ['The completion is fine.\nGrammar: 7/10\nCreativity: 5/10\nConsistency: 3/10',
               'I would say the grammar is about 8 and it is quite creative.']
    requests = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers['Content-Length'])))
        Judge.requests.append((self.path, self.headers.get('Authorization'), body))
        answer = self.answers[(len(Judge.requests) - 1) % 2]
        reply = json.dumps({'choices': [{'message': {'role': 'assistant', 'content': answer}}]}).encode()
        self.send_response(200)
        self.send_header('Content-Type', 'application/json')
        self.send_header('Content-Length', str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *args):
        pass


def test_judge_answers_are_read_strictly():
    grade = stories.grade
    assert grade('ok.\nGrammar: 7/10\nCreativity: 5/10\nConsistency: 3/10') == \
        {'grammar': 7, 'creativity': 5, 'consistency': 3}
    assert grade('**Grammar:** 9/10\n**Creativity**: 10/10\n- Consistency: 1/10')['creativity'] == 10
    for bad in ('Grammar: 7/10\nCreativity: 5/10', 'Grammar: 11/10\nCreativity: 5/10\nConsistency: 3/10',
                'Grammar: 7/10\nGrammar: 6/10\nCreativity: 5/10\nConsistency: 3/10', 'Grammar: seven/10',
                'Grammar: 7/10 Creativity: 5/10 Consistency: 3/10', 'Grammar: -7/10\nCreativity: 5/10\nConsistency: 3/10'):
        assert grade(bad) is None, bad


@needs_tokenizer
def test_a_judge_grades_the_stories_and_unreadable_answers_are_counted(setup, tmp_path):
    Judge.requests = []
    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Judge)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        out = tmp_path / 'judged.json'
        done = subprocess.run([sys.executable, 'eval.py', f'--out_dir={setup}', '--device=cpu', '--dtype=float32',
                               '--stories=2', '--max_new_tokens=10', '--grammar=False', f'--json_out={out}',
                               f'--judge_url=http://127.0.0.1:{server.server_port}/v1', '--judge_model=stand-in'],
                              cwd=ROOT, capture_output=True, text=True, timeout=120,
                              env={**os.environ, 'OPENAI_API_KEY': 'sk-test'})
    finally:
        server.shutdown()
    assert done.returncode == 0, done.stderr
    results = json.loads(out.read_text())
    for row in ('model', 'reference'):  # two stories each: one answer read, one not
        assert results[row]['judge_graded'] == 1 and results[row]['judge_unreadable'] == 1
        assert results[row]['judge_grammar'] == 7 and results[row]['judge_consistency'] == 3
    path, key, body = Judge.requests[0]
    assert path == '/v1/chat/completions' and key == 'Bearer sk-test' and body['model'] == 'stand-in'
    story = results['stories'][0]
    assert f"{story['opening']}***{story['model']}" in body['messages'][0]['content']
    assert 'judge answers could not be read' in done.stdout
