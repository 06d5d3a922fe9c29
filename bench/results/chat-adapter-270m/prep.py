"""Chat SFT data for the default adapter: short, benign, multi-turn replies whose turns end.

hh-rlhf harmless-base (MIT): the "chosen" dialogue of each pair, as messages, kept only when no
user turn scores >= 0.5 (first exchange only: red-team dialogues escalate later) on the project's offline toxicity scorer and no turn mentions a few
harm topics (the harmless set is red-team prompts: this keeps the benign ones). GSM8K train (MIT):
400 questions drawn with seed 0. Self-Instruct and the oasst trees are read by `train sft` as shipped.
"""
import gzip, json, random, re, sys
from opengemma.train.prefs import hh_dialogue
from opengemma.data import toxicity

D = "/work/shared/datasets"
HARM = re.compile(r"\b(kill|murder|steal|drug|bomb|weapon|gun|racist|sex|porn|hack|poison|cheat|"
                  r"rob|fuck|shit|bitch|nigg|cunt|slur|suicide|rape|illegal|prank|hurt|attack|meth|alcohol|drunk|drink|"
                  r"beer|wine|gambl|fight|revenge|lie|lying|insult|dumb|stupid|ugly|fat|hate|die|dead|death|"
                  r"blood|violen|abuse|smok|cigar|weed|crime|criminal|prison|jail|police|cop|torture|punch|"
                  r"slap|threat|scam|fraud|lock ?pick|break in|burglar|spy|stalk|explicit|naked|nude|curse|"
                  r"swear|offensive|trick|fake|forge|counterfeit|shoplift|vandal|arson|fire|knife|shoot|address|phone|locate|personal|black people|white people|jew|muslim|immigra|gay|race|racial|abortion|vote|religio|women|men are)", re.I)
out = []
with gzip.open(f"{D}/hh_rlhf/harmless-base/test.jsonl.gz", "rt") as f:
    dialogues = [hh_dialogue(json.loads(line)["chosen"])[:2] for line in f]  # the first exchange
users = [" ".join(m["content"] for m in d if m["role"] == "user") for d in dialogues]
scores = toxicity.score_document(users)
kept = [d for d, u, s in zip(dialogues, users, scores)
        if s < 0.5 and not any(HARM.search(m["content"]) for m in d)]
print(f"hh-rlhf chosen: {len(dialogues)} read, {len(kept)} kept", file=sys.stderr)
for d in kept:
    out.append({"messages": [{"role": "assistant" if m["role"] == "model" else m["role"], "content": m["content"]} for m in d]})
with open("hh_chosen_benign.jsonl", "w") as f:
    for r in out:
        f.write(json.dumps(r) + "\n")
gsm = [json.loads(l) for l in open(f"{D}/pretrain_math_gsm8k_train/train.jsonl")]
random.Random(0).shuffle(gsm)
with open("gsm8k_400.jsonl", "w") as f:
    for r in gsm[:400]:
        f.write(json.dumps({"question": r["question"], "answer": r["answer"]}) + "\n")
