"""Evaluation metrics: top-1 accuracy, VQA accuracy with the official answer normalization,
and caption exact match and token F1.

`normalize_answer` follows the rules of the VQA challenge's evaluation script
(vqaEval.py), step by step:
1. newlines and tabs become spaces; surrounding whitespace is stripped;
2. punctuation (`_PUNCTUATION`): each mark is deleted if it touches a space in
   the original text, or if the text anywhere has a comma between two digits
   ("1,000" -> "1000"); otherwise it becomes a space ("red/blue" -> "red blue").
   Then every period not followed by a digit is deleted ("yes." -> "yes",
   "2.5" stays). The apostrophe, colon and a few others are not in the list;
3. lowercase, split on whitespace, map number words "none"/"zero".."ten" to
   digits, drop the articles a/an/the, and restore the apostrophe of common
   contractions ("dont" -> "don't"); join with single spaces.

Scoring (`vqa_score`) differs from vqaEval.py in one deliberate way: the
official script normalizes the prediction only when the human answers
disagree, and applies only the punctuation step to the human answers, because
VQA's ground truth was normalized when it was collected. User data is not, so
here both sides always get the full normalization; on normalized ground truth
the two agree except that "Yes." now matches a unanimous "yes".

Captions (`caption_metrics`) have one or several references each (COCO has five).
Exact match and token F1 compare after `normalize_caption` (lowercase, punctuation to
spaces, articles dropped): exact match asks for the same text as any reference; token
F1 is the harmonic mean of word precision and recall, counted as multisets, against
the best reference (the SQuAD rule), averaged over captions. BLEU-4 and CIDEr-D follow
the COCO caption evaluation (pycocoevalcap, which the tests compare against): words
from `caption_words` (lowercase, punctuation as separators, articles kept), BLEU-4 over
the corpus with the closest reference length for the brevity penalty, CIDEr-D with
document frequencies from the evaluated references, clipped n-gram weights, a length
penalty of sigma 6, times 10.

Accuracies are fractions in [0, 1] (the official script prints percentages).
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Sequence

import torch

_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?",
                "!")
_COMMA_BETWEEN_DIGITS = re.compile(r"\d,\d")
# The official pattern is "(?!<=\d)(\.)(?!\d)": its first group is a (mistyped) lookahead that
# never blocks a match, so in effect it deletes every period not followed by a digit.
_PERIOD = re.compile(r"\.(?!\d)")
_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                 "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = frozenset({"a", "an", "the"})


def _contractions() -> dict[str, str]:
    """The official map from apostrophe-less spellings to contractions.

    Written as the contractions themselves. A contraction with one apostrophe
    is found without it ("dont" -> "don't"); one with two is found with either
    one dropped, but not both ("couldnt've", "couldn'tve" -> "couldn't've";
    "couldntve" stays). Contractions whose bare spelling is a word ("we'll",
    "it's", "she'd") are not in the table. The official table's capitalized keys
    ("Im", "Ive", "Id've") can never match lowercased text and are left out;
    its few irregular entries are added at the end as they are.
    """
    words = """
        ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't
        he'd he'd've he's how'd how'll how's isn't it'd it'd've it'll ma'am mightn't mightn't've might've mustn't
        must've needn't not've o'clock oughtn't shan't she'd've should've shouldn't shouldn't've
        somebody'd've somebody'll somebody's someone'd someone'd've someone'll someone's something'd
        something'd've something'll that's there'd there'd've there're there's they'd they'd've they'll
        they're they've wasn't we'd've we've weren't what'll what're what's what've when's where'd where's
        where've who'd who'd've who'll who's who've why'll why're why's won't would've wouldn't wouldn't've
        y'all y'all'll you'd you'd've you'll you're you've
    """.split()
    table: dict[str, str] = {}
    for word in words:
        parts = word.split("'")
        if len(parts) == 2:
            table["".join(parts)] = word
        else:
            table[parts[0] + parts[1] + "'" + parts[2]] = word
            table[parts[0] + "'" + parts[1] + parts[2]] = word
    table.update({
        # Three apostrophes: each spelling with one of them dropped.
        "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
        # Leading-apostrophe forms, identity entries, and one entry that maps the wrong way round.
        "twas": "'twas", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
        "let's": "let's", "she's": "she's", "somebody'd": "somebodyd",
    })
    return table


_CONTRACTIONS = _contractions()


def _strip_punctuation(text: str) -> str:
    delete_all = _COMMA_BETWEEN_DIGITS.search(text) is not None
    out = text
    for mark in _PUNCTUATION:
        if delete_all or mark + " " in text or " " + mark in text:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD.sub("", out)


def normalize_answer(text: str) -> str:
    """Normalize one answer string by the official VQA rules (see the module docstring)."""
    text = _strip_punctuation(text.replace("\n", " ").replace("\t", " ").strip())
    words = [_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def vqa_score(prediction: str, answers: Sequence[str]) -> float:
    """VQA accuracy of one prediction against the human answers, in [0, 1].

    Both sides are normalized. With exactly one answer this is exact match.
    With n > 1 answers it is the official leave-one-out soft score: the mean,
    over the n subsets that leave one answer out, of min(1, matches / 3). With
    the usual 10 answers: 1 match scores 0.3, 2 score 0.6, 3 score 0.9 and 4 or
    more score 1.0. Note that with 2 or 3 answers even a unanimous match cannot
    reach 1 (it scores 1/3 or 2/3): the rule was designed for 10 answers.
    Raises ValueError when `answers` is empty.
    """
    if isinstance(answers, str):
        raise TypeError("answers must be a sequence of strings, not one string")
    if len(answers) == 0:
        raise ValueError("vqa_score needs at least one reference answer")
    pred = normalize_answer(prediction)
    hits = [normalize_answer(a) == pred for a in answers]
    if len(hits) == 1:
        return float(hits[0])
    matches = sum(hits)
    return sum(min(1.0, (matches - hit) / 3) for hit in hits) / len(hits)


def vqa_accuracy(
    predictions: Sequence[str],
    answers_list: Sequence[Sequence[str]],
    answer_types: Sequence[str] | None = None,
) -> dict:
    """Mean `vqa_score` over a set of questions, overall and per answer type.

    Returns `{"accuracy": float, "count": int, "per_type": {type: {"accuracy":
    float, "count": int}}}`, accuracies as fractions in [0, 1]; `per_type` is
    empty when `answer_types` is None. Raises ValueError on mismatched lengths
    or no questions.
    """
    if len(predictions) != len(answers_list):
        raise ValueError(f"{len(predictions)} predictions but {len(answers_list)} answer lists")
    if answer_types is not None and len(answer_types) != len(predictions):
        raise ValueError(f"{len(predictions)} predictions but {len(answer_types)} answer types")
    if len(predictions) == 0:
        raise ValueError("vqa_accuracy needs at least one question")
    scores = [vqa_score(p, a) for p, a in zip(predictions, answers_list)]
    per_type: dict[str, dict] = {}
    if answer_types is not None:
        sums: dict[str, list[float]] = {}
        for score, kind in zip(scores, answer_types):
            sums.setdefault(kind, []).append(score)
        per_type = {k: {"accuracy": sum(v) / len(v), "count": len(v)} for k, v in sorted(sums.items())}
    return {"accuracy": sum(scores) / len(scores), "count": len(scores), "per_type": per_type}


def top1_accuracy(logits_or_preds, labels) -> float:
    """Fraction of rows whose top prediction equals the label.

    `logits_or_preds` is either logits `(N, K)` (argmax over the last dim) or
    predicted ids `(N,)`; `labels` is `(N,)`. Tensors, arrays and lists all work.
    Raises ValueError on mismatched shapes or N = 0.
    """
    preds = torch.as_tensor(logits_or_preds)
    labels = torch.as_tensor(labels)
    if preds.dim() == labels.dim() + 1:
        preds = preds.argmax(dim=-1)
    if preds.shape != labels.shape:
        raise ValueError(f"predictions of shape {tuple(preds.shape)} do not match labels of shape "
                         f"{tuple(labels.shape)}; pass logits (N, K) or ids (N,)")
    if labels.numel() == 0:
        raise ValueError("top1_accuracy needs at least one example")
    return (preds == labels).float().mean().item()


_CAPTION_PUNCTUATION = str.maketrans({c: " " for c in string.punctuation})


def normalize_caption(text: str) -> str:
    """Lowercase, punctuation to spaces, drop a/an/the, collapse whitespace."""
    words = text.lower().translate(_CAPTION_PUNCTUATION).split()
    return " ".join(w for w in words if w not in _ARTICLES)


def token_f1(prediction: str, reference: str) -> float:
    """F1 of the normalized words of `prediction` against `reference`, as multisets, in [0, 1]
    (1 when both are empty)."""
    pred, ref = normalize_caption(prediction).split(), normalize_caption(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def caption_words(text: str) -> list[str]:
    """Lowercase words with punctuation as separators; the tokens BLEU and CIDEr count."""
    return text.lower().translate(_CAPTION_PUNCTUATION).split()


def _ngrams(words: list[str], n: int) -> Counter:
    return Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))


def bleu4(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus BLEU-4 in [0, 1]: clipped n-gram precisions (n = 1..4) summed over the corpus,
    their geometric mean, times exp(1 - r/c) when the predictions' c words are fewer than the
    r words of the references closest in length (the shorter on a tie)."""
    matched, total = [0] * 4, [0] * 4
    pred_len = ref_len = 0
    for prediction, refs in zip(predictions, references, strict=True):
        words = caption_words(prediction)
        ref_words = [caption_words(r) for r in refs]
        pred_len += len(words)
        ref_len += min((len(r) for r in ref_words), key=lambda n: (abs(n - len(words)), n))
        for n in range(1, 5):
            counts = _ngrams(words, n)
            most = Counter()
            for r in ref_words:
                most |= _ngrams(r, n)  # an n-gram counts at most as often as in one reference
            matched[n - 1] += sum((counts & most).values())
            total[n - 1] += max(len(words) - n + 1, 0)
    if min(matched) == 0:
        return 0.0
    log_precision = sum(math.log(m / t) for m, t in zip(matched, total)) / 4
    brevity = min(0.0, 1 - ref_len / pred_len)
    return math.exp(log_precision + brevity)


def cider_d(predictions: Sequence[str], references: Sequence[Sequence[str]], sigma: float = 6.0) -> float:
    """CIDEr-D (Vedantam et al. 2015, as the COCO evaluation computes it), averaged over
    captions: for n = 1..4, the cosine of TF-IDF n-gram vectors of prediction and each
    reference, with the prediction's weights clipped at the reference's and a Gaussian penalty
    on the length difference; averaged over references and n, times 10. IDF counts the
    captions whose references contain an n-gram, so the score depends on the evaluated set."""
    refs_words = [[caption_words(r) for r in refs] for refs in references]
    pred_words = [caption_words(p) for p in predictions]
    if len(pred_words) != len(refs_words):
        raise ValueError(f"{len(pred_words)} predicted captions but {len(refs_words)} reference sets")
    document_frequency: Counter = Counter()
    for refs in refs_words:
        document_frequency.update({g for r in refs for n in range(1, 5) for g in _ngrams(r, n)})
    log_count = math.log(len(refs_words)) if refs_words else 0.0

    def vectors(words: list[str]) -> tuple[list[dict], list[float]]:
        vecs, norms = [], []
        for n in range(1, 5):
            vec = {g: tf * (log_count - math.log(max(1.0, document_frequency[g])))
                   for g, tf in _ngrams(words, n).items()}
            vecs.append(vec)
            norms.append(math.sqrt(sum(v * v for v in vec.values())))
        return vecs, norms

    scores = []
    for words, refs in zip(pred_words, refs_words):
        pred_vecs, pred_norms = vectors(words)
        total = 0.0
        for ref in refs:
            ref_vecs, ref_norms = vectors(ref)
            # length in bigrams, as the COCO code counts it: one less than the words
            penalty = math.exp(-((max(len(words) - 1, 0) - max(len(ref) - 1, 0)) ** 2) / (2 * sigma**2))
            for pv, pn, rv, rn in zip(pred_vecs, pred_norms, ref_vecs, ref_norms):
                if pn and rn:
                    dot = sum(min(v, rv[g]) * rv[g] for g, v in pv.items() if g in rv)
                    total += penalty * dot / (pn * rn)
        scores.append(10.0 * total / (4 * len(refs)) if refs else 0.0)
    return sum(scores) / len(scores) if scores else 0.0


def caption_metrics(predictions: Sequence[str], references: Sequence[str | Sequence[str]]) -> dict:
    """`{"exact_match", "token_f1", "bleu4", "cider", "count"}` over predicted captions, each
    with one reference (a string) or several (a list of strings). Raises ValueError on
    mismatched lengths, no captions, or a caption without references."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predicted captions but {len(references)} references")
    if len(predictions) == 0:
        raise ValueError("caption_metrics needs at least one caption")
    refs = [[r] if isinstance(r, str) else list(r) for r in references]
    if not all(refs):
        raise ValueError("every caption needs at least one reference")
    exact = [any(normalize_caption(p) == normalize_caption(r) for r in rs) for p, rs in zip(predictions, refs)]
    f1 = [max(token_f1(p, r) for r in rs) for p, rs in zip(predictions, refs)]
    return {"exact_match": sum(exact) / len(exact), "token_f1": sum(f1) / len(f1), "bleu4": bleu4(predictions, refs),
            "cider": cider_d(predictions, refs), "count": len(exact)}
