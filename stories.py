"""
Stories in readers' terms: the text metrics of eval.py --stories (and the story writing that rate.py
shares). Every score reads plain text, so it scores real stories as well as a model's:
  bleu            sacrebleu's corpus BLEU (0-100) of the continuations against the real ones
  misspelt        the share of words that are not English words: pyspellchecker's English word list,
                  and the names the training stories capitalise (Lily, Tim, ...)
  unparsed        the share of sentences that CMU's link grammar cannot parse whole (`link-parser`,
                  Debian's link-grammar); None when it is not installed
  repeated_4grams the share of a story's word 4-grams that it already used, averaged over the stories
  distinct_2/3    distinct word 2- and 3-grams over all of them, across the stories (Li et al. 2016)
  self_bleu       the BLEU of each story against all the others (Zhu et al. 2018): high is alike
  copied_ngrams   the share of word n-grams (copy_n words) found in the training stories, and the
                  longest span copied word for word, with the story it came from
  ended           the share of continuations that end (<|endoftext|>) within max_new_tokens
"""
import collections
import concurrent.futures
import os
import re
import shutil
import subprocess

import numpy as np

WORD = re.compile(r"[A-Za-z]+(?:'[A-Za-z]+)*")  # words: letters, with inner apostrophes (didn't, Lily's)
SENTENCE = re.compile(r'[^.!?]*[.!?]+["\u201d]?|[^.!?]+$')  # up to . ! or ?, with a closing quote
LINK_PARSER = 'link-parser'


# -----------------------------------------------------------------------------
# stories in and out

def split_documents(tokens, eot):
    """The documents of a split's tokens (numpy), each a list of ids, split at eot."""
    ends = np.flatnonzero(np.asarray(tokens) == eot)
    bounds = zip(np.concatenate(([-1], ends)), np.concatenate((ends, [len(tokens)])))
    return [tokens[a + 1:b].tolist() for a, b in bounds if b > a + 1]


def opening(text, enc, n_tokens=0):
    """(the opening, the rest) of a story: its first sentence, or its first n_tokens tokens back to the
    end of a word (a continuation that began inside a word would begin with a misspelling). The rest
    keeps its leading space, which the model writes as part of its first token."""
    if n_tokens:
        ids = enc.encode_ordinary(text)
        if len(ids) <= n_tokens:
            return text, ''
        head = enc.decode(ids[:n_tokens])
        cut = max(head.rfind(' '), head.rfind('\n'))
        cut = cut if cut > 0 else re.match(r'\s*\S*', text).end()  # within the first word: all of it
        return text[:cut], text[cut:]
    first = SENTENCE.match(text)
    cut = first.end() if first else len(text)
    return text[:cut], text[cut:]


def whole_words(text):
    """text up to its last whitespace: a story cut at a token count may end inside a word, which is
    no misspelling."""
    cut = max(text.rfind(' '), text.rfind('\n'))
    return text[:cut] if cut > 0 else text


def cut_tokens(text, enc, max_tokens):
    """text cut to its first max_tokens tokens (then to whole words), and whether all of it fitted (the story ended)."""
    ids = enc.encode_ordinary(text)
    if len(ids) <= max_tokens:
        return text, True
    return whole_words(enc.decode(ids[:max_tokens])), False


def continue_stories(model, enc, openings, max_new_tokens, temperature=0.8, top_k=200, top_p=None, seed=1337,
                     batch_size=16, window_shift=None):
    """[(continuation text, whether it ended with <|endoftext|>)] for each opening text (one cut at
    max_new_tokens is cut to whole words, as cut_tokens cuts the real ones), decoded
    batch_size at a time by rows.Rows; story i draws from its own generator seeded seed + i,
    so its text does not depend on which stories share its batch."""
    from rows import Rows
    rows = Rows(model, max_rows=max(1, min(batch_size, len(openings))), window_shift=window_shift)
    todo, active, out = collections.deque(enumerate(openings)), {}, [None] * len(openings)
    while todo or active:
        while todo and rows.free:
            i, text = todo.popleft()
            # as sample.py: every story in train.bin follows an <|endoftext|>
            slot = rows.add([enc.eot_token] + enc.encode_ordinary(text), temperature, top_k, top_p, seed=seed + i)
            active[slot] = (i, [])
        for slot, token in rows.step().items():
            i, new = active[slot]
            ended = token == enc.eot_token
            if not ended:
                new.append(token)
            if ended or len(new) == max_new_tokens:
                text = enc.decode([t for t in new if t < enc.n_vocab])  # ids past the tokenizer's have no text
                out[i] = (text if ended else whole_words(text), ended)
                rows.remove(slot)
                del active[slot]
    return out


# -----------------------------------------------------------------------------
# the scores

def words(text):
    return WORD.findall(text)


def ngrams(tokens, n):
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def bleu(hypotheses, references):
    """sacrebleu's corpus BLEU (0-100; the seed's 0.24 is 24 here), one reference each."""
    import sacrebleu
    return sacrebleu.corpus_bleu(hypotheses, [references]).score


def self_bleu(texts):
    """sacrebleu's corpus BLEU of each text against all the others as its references. sacrebleu's own
    corpus_bleu with n-1 reference streams gives the same number but reads every reference n-1 times
    (83 s for 200 stories); here each text's n-grams are counted once, and the clipping count of an
    n-gram for text i is its largest count in a text other than i."""
    from sacrebleu.metrics.bleu import BLEU
    from sacrebleu.metrics.helpers import extract_all_word_ngrams
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a
    if len(texts) < 2:
        return None
    tokenize = Tokenizer13a()
    counted = [extract_all_word_ngrams(tokenize(t.rstrip()), 1, 4) for t in texts]
    top = {}  # n-gram -> [(largest count, its text), (second largest, its text)]
    for i, (counts, _) in enumerate(counted):
        for g, c in counts.items():
            best = top.setdefault(g, [(0, -1), (0, -1)])
            if c > best[0][0]:
                best[0], best[1] = (c, i), best[0]
            elif c > best[1][0]:
                best[1] = (c, i)
    lengths = [n for _, n in counted]
    correct, total, sys_len, ref_len = [0] * 4, [0] * 4, 0, 0
    for i, (counts, n) in enumerate(counted):
        others = lengths[:i] + lengths[i + 1:]
        sys_len += n
        ref_len += min(others, key=lambda r: (abs(r - n), r))  # the closest reference length, as sacrebleu
        for g, c in counts.items():
            best = top[g]
            clip = best[0][0] if best[0][1] != i else best[1][0]
            total[len(g) - 1] += c
            correct[len(g) - 1] += min(c, clip)
    return BLEU.compute_bleu(correct, total, sys_len, ref_len, smooth_method='exp').score


class Speller:
    """English words: pyspellchecker's English list (~160K words, with their inflections), and the
    names that the training stories capitalise but never write in lower case (Lily, Timmy, Spot is
    both). A capitalised word counts as a name only capitalised."""

    def __init__(self, names=()):
        from spellchecker import SpellChecker
        self.known = SpellChecker(language='en').word_frequency
        self.names = set(names)

    @staticmethod
    def names_in(texts):
        found = [w for t in texts for w in words(t)]
        lower = {w for w in found if w.islower()}
        return {w for w in found if w[0].isupper() and w[1:].islower() and w.lower() not in lower}

    def is_word(self, w):
        w = re.sub(r"'s$", '', w)  # Lily's
        return w in self.names or w.lower() in self.known

    def misspelt(self, texts):
        """(the share of words that are not words, the commonest of those with their counts)."""
        found = [w for t in texts for w in words(t)]
        bad = collections.Counter(w for w in found if not self.is_word(w))
        return sum(bad.values()) / max(1, len(found)), bad.most_common(10)


def sentences(text):
    return [' '.join(m.group().split()) for m in SENTENCE.finditer(text) if m.group().strip()]


def unparsed(texts, timeout=600):
    """(the share of sentences that link grammar cannot link whole, those sentences), or (None, reason)
    when `link-parser` (Debian's link-grammar) is absent. Double quotes are dropped: dialogue's quote
    marks split sentences in ways the parser does not expect, and carry no grammar."""
    if not shutil.which(LINK_PARSER):
        return None, f'not measured: {LINK_PARSER} is not installed (apt-get install link-grammar)'
    found = [s.replace('"', '').replace('\u201c', '').replace('\u201d', '') for t in texts for s in sentences(t)]
    found = [' '.join(re.sub(r'[\x00-\x1f\x7f-\x9f]', ' ', s).split()) for s in found]  # a NUL ends its line there
    # a line that begins with '!' is a link-parser command, one with '%' a comment: begin each at a word
    found = [re.sub(r'^\W+', '', s) for s in found if WORD.search(s)]
    if not found:
        return 0.0, []
    # batch mode reports "+++++ error N" after each echoed sentence it cannot link whole (no spelling guesses)
    settings = '!batch\n!graphics=0\n!verbosity=0\n!echo=1\n!spell=0\n!timeout=2\n'

    def parse(part):  # ~15 ms a sentence: one link-parser per core
        out = subprocess.run([LINK_PARSER, 'en'], input=settings + '\n'.join(part) + '\n', capture_output=True,
                             text=True, timeout=timeout).stdout.splitlines()
        failed, i = [], 0
        for line in out:
            if i < len(part) and line == part[i]:
                i += 1
            elif line.startswith('+++++ error') and i:
                failed.append(part[i - 1])
        if i != len(part):
            raise RuntimeError(f'{LINK_PARSER} echoed {i} of {len(part)} sentences')
        return failed

    k = max(1, min(os.cpu_count() or 1, len(found) // 50))
    with concurrent.futures.ThreadPoolExecutor(k) as pool:
        bad = [s for failed in pool.map(parse, [found[j::k] for j in range(k)]) for s in failed]
    return len(bad) / len(found), bad


def repeated(texts, n=4):
    """The share of each text's word n-grams that it used before, averaged over the texts that have any."""
    shares = []
    for t in texts:
        grams = ngrams([w.lower() for w in words(t)], n)
        if grams:
            shares.append(1 - len(set(grams)) / len(grams))
    return sum(shares) / len(shares) if shares else 0.0


def distinct(texts, n):
    """Distinct word n-grams over all n-grams of all the texts."""
    grams = [g for t in texts for g in ngrams([w.lower() for w in words(t)], n)]
    return len(set(grams)) / len(grams) if grams else 0.0


class CopyIndex:
    """The training stories' word n-grams (lower case), to find what a story copies from them."""

    def __init__(self, stories, n=8):
        self.n, self.stories = n, stories
        self.words = [[w.lower() for w in words(s)] for s in stories]
        self.where = collections.defaultdict(list)  # n-gram -> [(story, position)]
        for s, ws in enumerate(self.words):
            for p, g in enumerate(ngrams(ws, n)):
                self.where[g].append((s, p))

    def copied(self, texts):
        """{'copied_ngrams': the share of the texts' n-grams found in a training story,
        'longest_copy': {'words', 'text', 'story', 'from'} for the longest span that one training story
        holds word for word (text: which of texts; story: which training story)}."""
        hits = total = 0
        longest = {'words': 0, 'text': None, 'story': None, 'from': ''}
        for t, text in enumerate(texts):
            ws = [w.lower() for w in words(text)]
            grams = ngrams(ws, self.n)
            total += len(grams)
            for i, g in enumerate(grams):
                places = self.where.get(g)
                if not places:
                    continue
                hits += 1
                for s, p in places:
                    story, k = self.words[s], self.n
                    if i and p and ws[i - 1] == story[p - 1]:  # inside a span found from an earlier word
                        continue
                    while i + k < len(ws) and p + k < len(story) and ws[i + k] == story[p + k]:
                        k += 1
                    if k > longest['words']:
                        longest = {'words': k, 'text': t, 'story': s, 'from': ' '.join(story[p:p + k])}
        return {'copied_ngrams': hits / total if total else 0.0, 'longest_copy': longest}


def score(texts, ended=None, references=None, speller=None, copies=None, grammar=True):
    """Every score of texts (the continuations) as a dict; bleu against references when given,
    ended the share of True in ended when given."""
    result = {'stories': len(texts), 'words': sum(len(words(t)) for t in texts)}
    if references is not None:
        result['bleu'] = bleu(texts, references)
    if speller is not None:
        result['misspelt'], result['misspelt_words'] = speller.misspelt(texts)
    if grammar:
        result['unparsed'], bad = unparsed(texts)
        result['unparsed_examples' if result['unparsed'] is not None else 'unparsed_note'] = \
            bad[:5] if result['unparsed'] is not None else bad
    result['repeated_4grams'] = repeated(texts)
    result['distinct_2'], result['distinct_3'] = distinct(texts, 2), distinct(texts, 3)
    result['self_bleu'] = self_bleu(texts)
    if copies is not None:
        result.update(copies.copied(texts))
    if ended is not None:
        result['ended'] = sum(ended) / len(ended) if ended else 0.0
    return result


# -----------------------------------------------------------------------------
# a model judge (eval.py --judge_url)

JUDGE = """In the following exercise, the student is given a beginning of a story. The student needs to complete it \
into a full story. The exercise tests the student's language abilities and creativity. The symbol *** marks the \
separator between the prescribed beginning and the student's completion:

{story}

Please provide your general assessment about the part written by the student (the one after the *** symbol). Is it \
grammatically correct? Is it consistent with the beginning of the story? Pay special attention to whether the \
student manages to complete the sentence which is split in the middle by the separator ***. Now, grade the \
student's completion in terms of grammar, creativity, and consistency with the story's beginning and whether the \
plot makes sense, each from 1 to 10. End your answer with exactly these three lines:
Grammar: N/10
Creativity: N/10
Consistency: N/10"""  # the TinyStories paper's questions (Eldan and Li 2023, GPT-Eval), with a fixed answer form
GRADES = ('grammar', 'creativity', 'consistency')


def grade(answer):
    """{grammar, creativity, consistency} from a judge's answer, or None unless each line is there
    exactly once with a whole number from 1 to 10: an answer is never guessed at."""
    found = {}
    for name in GRADES:
        # a line of its own, Markdown's bold or bullet allowed: "**Grammar:** 7/10", "- Grammar: 7/10."
        lines = re.findall(rf'^[\s*_#>-]*{name}[\s*_]*:[\s*_]*(\d+)\s*/\s*10[\s*_.]*$', answer, re.I | re.M)
        if len(lines) != 1 or not 1 <= int(lines[0]) <= 10:
            return None
        found[name] = int(lines[0])
    return found
