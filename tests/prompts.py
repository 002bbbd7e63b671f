"""Prompts in AltDiffusion-m9's nine languages, for training test tokenizers and for parity checks."""

PROMPTS = {
    "en": [
        "a red circle on a white background",
        "dark elf princess, highly detailed, fantasy, digital painting, concept art, sharp focus",
        "a watercolor painting of a lighthouse at sunset",
        "an old man reading a newspaper in a cafe, soft light",
        "a small dog wearing a hat, photograph",
    ],
    "zh": [
        "白色背景上的红色圆圈",
        "黑暗精灵公主，非常详细，幻想，数字绘画，概念艺术，敏锐的焦点",
        "日落时灯塔的水彩画",
        "一只戴着帽子的小狗",
        "带墨镜的男孩肖像，充满细节，8K高清",
    ],
    "es": [
        "un círculo rojo sobre un fondo blanco",
        "una princesa elfa oscura, muy detallada, fantasía, pintura digital",
        "una acuarela de un faro al atardecer",
        "un perro pequeño con un sombrero, fotografía",
    ],
    "fr": [
        "un cercle rouge sur un fond blanc",
        "une princesse elfe noire, très détaillée, fantaisie, peinture numérique",
        "une aquarelle d'un phare au coucher du soleil",
        "un petit chien portant un chapeau, photographie",
    ],
    "ru": [
        "красный круг на белом фоне",
        "принцесса тёмных эльфов, очень детально, фэнтези, цифровая живопись",
        "акварель маяка на закате",
        "маленькая собака в шляпе, фотография",
    ],
    "ja": [
        "白い背景に赤い円",
        "ダークエルフの王女、非常に詳細、ファンタジー、デジタルペインティング",
        "夕暮れの灯台の水彩画",
        "帽子をかぶった小さな犬、写真",
    ],
    "ko": [
        "흰색 배경 위의 빨간 원",
        "다크 엘프 공주, 매우 상세한, 판타지, 디지털 페인팅",
        "해질녘 등대의 수채화",
        "모자를 쓴 작은 개, 사진",
    ],
    "ar": [
        "دائرة حمراء على خلفية بيضاء",
        "أميرة الجان المظلمة، مفصلة للغاية، خيال، رسم رقمي",
        "لوحة مائية لمنارة عند غروب الشمس",
        "كلب صغير يرتدي قبعة، صورة فوتوغرافية",
    ],
    "it": [
        "un cerchio rosso su uno sfondo bianco",
        "una principessa elfa oscura, molto dettagliata, fantasy, pittura digitale",
        "un acquerello di un faro al tramonto",
        "un piccolo cane con un cappello, fotografia",
    ],
}

ALL_PROMPTS = [p for ps in PROMPTS.values() for p in ps]

# Prompts that stress the tokenizer's edges: the same behaviour is required of ours and the reference.
EDGE_PROMPTS = [
    "",  # empty: just <s> </s>
    "   ",  # whitespace only
    " \t\n ",
    "  leading and trailing spaces  ",
    "several   spaces   between",
    "🐶 a dog with a hat 🎩",  # emoji: not in the test vocabulary → <unk>
    "ऊँट और ᚠᚢᚦ",  # Devanagari and runes: characters never seen in training
    "ＦＵＬＬ－ＷＩＤＴＨ ｌｅｔｔｅｒｓ",  # NFKC normalisation
    ", ".join(ALL_PROMPTS),  # far longer than 77 tokens: truncated with </s> kept last
]
