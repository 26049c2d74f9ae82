"""Text-classification tasks beyond SST-2, built from text Debian ships (issue 15).

Issue 15 asks whether pretraining pays on tasks other than the one the recipe was measured on.
Neither task below is in ../shared, neither was looked at while choosing the recipe, and neither
text is in the pretraining corpus. Both come from Debian packages, read where Debian installs
them; nothing is copied into the project:

  wordnet   `apt-get install wordnet-base`: a WordNet 3.0 noun gloss (its definition, without
            the example quotes or the words it defines) -> the synset's lexicographer file,
            WordNet's 25 noun supersenses (noun.animal, noun.artifact, ...; noun.Tops, the
            handful of top-level concepts, is left out). Short formal English, many classes.
  fortunes  `apt-get install fortunes`: a fortune-cookie text -> the topical file it ships in
            (computers, politics, science, law, food, ...; the files named by style, such as
            `cookie` or `platitudes`, are left out). Jokes, quotes and verse, noisy labels.

Each task is written as train / dev / test TSVs (`sentence<TAB>label`, labels are the category
names, which `minibert.finetune` maps to ids itself), split with a fixed seed:

    python benchmarks/other_tasks.py --out runs/tasks
    python -m minibert.finetune --init runs/pretrain --train runs/tasks/wordnet/train.tsv \\
        --dev runs/tasks/wordnet/dev.tsv --test runs/tasks/wordnet/test.tsv

Results: docs/finetune_results.md and benchmarks/pretrain_results.md (tenth round).
"""

from __future__ import annotations

import argparse
import random
import re
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

WORDNET = Path("/usr/share/wordnet")
FORTUNES = Path("/usr/share/games/fortunes")
# WordNet's noun lexicographer files 03-28 (lexnames(5WN)): the noun supersenses.
NOUN_FILES = dict(enumerate(
    "Tops act animal artifact attribute body cognition communication event feeling food "
    "group location motive object person phenomenon plant possession process quantity "
    "relation shape state substance time".split(), start=3))
# The fortune files whose name says what they are about, with at least ~200 entries each.
FORTUNE_TOPICS = ("computers", "politics", "work", "science", "men-women", "art",
                  "literature", "drugs", "law", "education", "food")


def wordnet_glosses(data_noun: Path) -> list[tuple[str, str]]:
    """(definition, supersense) for every noun synset in a WordNet `data.noun` file.

    A data line is `offset lex_filenum ss_type w_cnt word lex_id ... | gloss`; the gloss is the
    definition, then optional `; "example"` quotes, which often contain the word itself.
    """
    rows = []
    for line in data_noun.read_text(encoding="utf-8").splitlines():
        if line.startswith("  ") or "|" not in line:
            continue                                   # the licence header, indented two spaces
        fields, gloss = line.split("|", 1)
        lex = int(fields.split()[1])
        definition = re.split(r';\s*"', gloss)[0].strip().rstrip(";").strip()
        if lex == 3 or not definition:
            continue
        rows.append((definition, "noun." + NOUN_FILES[lex]))
    return rows


def fortune_entries(root: Path, topics=FORTUNE_TOPICS) -> list[tuple[str, str]]:
    """(text, file name) for every fortune in the topical files; entries are separated by `%` lines."""
    rows = []
    for topic in topics:
        text = (root / topic).read_text(encoding="utf-8", errors="replace")
        for entry in re.split(r"^%\s*$", text, flags=re.M):
            entry = " ".join(entry.split())            # one line: TSV rows can't hold newlines or tabs
            if entry:
                rows.append((entry, topic))
    return rows


def split(rows, dev: int, test: int, train: int, seed: int = 0):
    """Shuffle with a fixed seed, drop exact duplicate texts, cut test, dev, then train (0 = rest)."""
    seen, unique = set(), []
    for text, label in rows:
        if text not in seen:
            seen.add(text)
            unique.append((text, label))
    random.Random(seed).shuffle(unique)
    test_rows, dev_rows = unique[:test], unique[test:test + dev]
    rest = unique[test + dev:]
    return rest[:train] if train else rest, dev_rows, test_rows


def write_tsv(path: Path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write("sentence\tlabel\n")
        for text, label in rows:
            f.write(f"{text}\t{label}\n")


def tfidf_baseline(folder: Path) -> float:
    """Test accuracy of TF-IDF (word 1-2 grams) + logistic regression trained on train.tsv: the
    reference a pretrained encoder should approach, as the 81.9 on SST-2 in ../shared's README."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from minibert.tabular import read_labeled

    train, test = read_labeled(folder / "train.tsv"), read_labeled(folder / "test.tsv")
    vec = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=1)
    clf = LogisticRegression(C=10.0, max_iter=2000).fit(vec.fit_transform(train.texts), train.labels)
    return float(clf.score(vec.transform(test.texts), test.labels))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/tasks", help="folder for <task>/{train,dev,test}.tsv")
    p.add_argument("--wordnet", default=str(WORDNET), help="WordNet dict folder (has data.noun)")
    p.add_argument("--fortunes", default=str(FORTUNES), help="fortune files folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tfidf", action="store_true", help="also score TF-IDF + logistic regression "
                   "(needs scikit-learn)")
    args = p.parse_args()
    out = Path(args.out)
    tasks = {
        # 4,000 training rows, as the SST-2 sample; larger test sets than SST-2's 872 rows.
        "wordnet": (lambda: wordnet_glosses(Path(args.wordnet) / "data.noun"), 1000, 2000, 4000),
        "fortunes": (lambda: fortune_entries(Path(args.fortunes)), 500, 1000, 0),
    }
    for name, (read, dev, test, train) in tasks.items():
        rows = read()
        tr, dv, te = split(rows, dev, test, train, args.seed)
        for part, part_rows in (("train", tr), ("dev", dv), ("test", te)):
            write_tsv(out / name / f"{part}.tsv", part_rows)
        counts = Counter(label for _, label in te)
        majority = counts.most_common(1)[0][1] / len(te)
        print(f"{name}: {len(rows)} rows, {len(counts)} classes; train {len(tr)}, dev {len(dv)}, "
              f"test {len(te)} (majority class {majority:.3f} of test)")
        if args.tfidf:
            print(f"  TF-IDF + logistic regression: test accuracy {tfidf_baseline(out / name):.3f}")


if __name__ == "__main__":
    main()
