"""Example files for the README's "Your own data" recipe: two hospitals' Chinese medical
question/answer pairs, each hospital its own file, and a public text for the tokenizer.

    python launch/write_qa_example.py --out runs/qa-data

writes ``client0.json`` and ``client1.json`` (JSON arrays of ``{"question", "answer"}``, the
layout FL-GLM's own medical set uses), ``dev0.json`` and ``dev1.json`` (each hospital's held-out
pairs) and ``public.txt`` (health-leaflet sentences anyone may read: what ``flglm tokenizer``
builds the shared vocabulary from, so no hospital's text shapes it). The pairs are generated
from templates (symptom → department and advice), so a small model can learn them; the two
hospitals see different mixes of symptoms (hospital 0 mostly adults, hospital 1 mostly children).
Replace these files with your own.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

# symptom, department, advice
CASES: list[tuple[str, str, str]] = [
    ("头痛", "神经内科", "注意休息，避免熬夜"),
    ("咳嗽", "呼吸内科", "多喝温水，少吃辛辣食物"),
    ("发烧", "发热门诊", "按时测量体温，多补充水分"),
    ("胃痛", "消化内科", "饮食清淡，按时吃饭"),
    ("腹泻", "消化内科", "注意补液，不要吃生冷食物"),
    ("失眠", "精神心理科", "睡前少看手机，规律作息"),
    ("皮疹", "皮肤科", "不要抓挠，穿宽松的衣服"),
    ("牙痛", "口腔科", "饭后漱口，少吃甜食"),
    ("胸闷", "心内科", "避免剧烈运动，尽快做心电图"),
    ("关节痛", "骨科", "减少负重，注意保暖"),
    ("眼睛干涩", "眼科", "减少用眼时间，多眨眼"),
    ("耳鸣", "耳鼻喉科", "远离噪音，保证睡眠"),
]
ADULT = [0, 1, 3, 5, 8, 9, 10, 11]
CHILD = [1, 2, 4, 6, 7, 2, 4, 1]
DURATIONS = ["两天", "三天", "一周", "半个月", "一个月"]
WHO = {0: ["我", "我妈妈", "我爸爸", "我爱人"], 1: ["我孩子", "我女儿", "我儿子", "宝宝"]}
QUESTION = ["{who}{symptom}{duration}了，应该挂什么科？", "{who}最近{symptom}，已经{duration}了，怎么办？", "{who}{symptom}{duration}，需要去医院吗？"]
ANSWER = "{symptom}{duration}，建议到{department}就诊。{advice}。"
LEAFLET = [
    "{symptom}是常见的症状，一般可以到{department}就诊。",
    "如果{symptom}持续{duration}以上，请及时就医。",
    "医生建议：{advice}。",
    "{department}的医生会先询问病史，再安排检查。",
    "出现{symptom}时，{advice}，必要时到医院检查。",
]


def qa_pairs(hospital: int, rows: int, rng: random.Random) -> list[dict[str, str]]:
    cases = ADULT if hospital == 0 else CHILD
    out = []
    for _ in range(rows):
        symptom, department, advice = CASES[rng.choice(cases)]
        duration = rng.choice(DURATIONS)
        question = rng.choice(QUESTION).format(who=rng.choice(WHO[hospital]), symptom=symptom, duration=duration)
        out.append({"question": question, "answer": ANSWER.format(symptom=symptom, duration=duration, department=department, advice=advice)})
    return out


def leaflet(lines: int, rng: random.Random) -> list[str]:
    out = []
    for _ in range(lines):
        symptom, department, advice = rng.choice(CASES)
        out.append(rng.choice(LEAFLET).format(symptom=symptom, department=department, advice=advice, duration=rng.choice(DURATIONS)))
    return out


def write_qa_example(out: Path, *, train_rows: int = 600, dev_rows: int = 48, seed: int = 0) -> list[Path]:
    """Write the example files into ``out`` (created); refuses to replace files already there."""
    names = ["client0.json", "client1.json", "dev0.json", "dev1.json", "public.txt"]
    existing = [n for n in names if (out / n).exists()]
    if existing:
        raise SystemExit(f"write_qa_example: error: {out} already holds {', '.join(existing)}; remove them or pick another --out")
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for hospital in (0, 1):
        (out / f"client{hospital}.json").write_text(json.dumps(qa_pairs(hospital, train_rows, rng), ensure_ascii=False, indent=1), encoding="utf-8")
        (out / f"dev{hospital}.json").write_text(json.dumps(qa_pairs(hospital, dev_rows, rng), ensure_ascii=False, indent=1), encoding="utf-8")
    (out / "public.txt").write_text("\n".join(leaflet(400, rng)) + "\n", encoding="utf-8")
    return [out / n for n in names]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="write_qa_example", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/qa-data", help="directory to write (default: runs/qa-data)")
    parser.add_argument("--train-rows", type=int, default=600, help="question/answer pairs per hospital")
    parser.add_argument("--dev-rows", type=int, default=48, help="held-out pairs per hospital")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for path in write_qa_example(Path(args.out), train_rows=args.train_rows, dev_rows=args.dev_rows, seed=args.seed):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
