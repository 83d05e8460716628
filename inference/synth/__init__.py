"""Synthetic conversations for training and evaluating the interaction model: ``microturn data synth``.

Scripted two-party conversations (:mod:`~inference.synth.scenarios`) rendered as time-aligned micro-turn streams:
the user speaks in many espeak-ng voices, rates and pitches, over background noise, at changing levels, shows cards
on the camera and types; the model speaks in one fixed voice. This docstring is the data format: the contract that
the trainer (:mod:`inference.conversation`) and the evaluator read.

``DIR/manifest.json``
    ``version`` (1), ``seed``, ``split_seed``, ``hours_requested``, ``hours_produced``, ``seconds_produced``,
    ``conversations``, ``sample_rate`` (16000), ``micro_turn_samples`` (3200), ``latency_turns`` (1),
    ``stop_turns`` (1), ``text_bytes_per_turn`` (4), ``espeak_ng`` (its version), ``model_voice`` {name,
    variant, rate, pitch}, ``scenarios`` (conversations per scenario), and ``splits``: for each of ``train``,
    ``validation``, ``test``: ``conversations`` (ids), ``seconds``, ``scenarios`` (counts), ``voices`` (the
    ``name+variant`` voices the split may use) and ``phrasings`` (the template ids it may use). Splits share no
    voice and no phrasing (:mod:`~inference.synth.splits`); which ones each split gets is drawn from ``split_seed``
    alone (0 unless ``--split-seed`` says otherwise), so sets with another ``seed`` hold other conversations but
    the same held-out voices and phrasings: a model trained on one set's train split is held out from another's
    test split.

``DIR/<split>/<id>.npz`` — T micro-turns, sample ``s`` of the 16 kHz timeline is in micro-turn ``s // 3200``
    ``user_audio`` float32 (T·3200,): what the user's microphone hears (speech, noise; nothing of the model).
    ``model_audio`` float32 (T·3200,): the model's target speech; exactly 0.0 outside ``model_speech``.
    ``video`` uint8 (T, 120, 160, 3): the RGB frame shown at the end of each micro-turn; zeros while the camera is off.
    ``camera`` bool (T,): whether the camera is on.

``DIR/<split>/<id>.json``
    ``id``, ``split``, ``scenario``, ``voice`` {name, variant, rate, pitch} (the user's), ``noise`` {colour, rms},
    ``phrasing`` (the template ids the user's turns used, in order), ``turns`` (T), and per micro-turn lists of T:
    ``user_text`` (texts typed in that micro-turn), ``background`` (background-model results arriving as input in
    it), ``model_text`` (the caption text the model writes in it), ``model_speaks`` (whether any of
    ``model_speech`` falls in it). Spans ``[start, end)`` in samples: ``user_speech`` (each user utterance, exact:
    its first to last rendered sample) with ``user_speech_text`` (what each says), ``model_speech``, ``pauses``
    (the user's pauses inside one turn: mid-question, or between the sentences of a long statement; neither speaks
    in them), ``overlaps`` (from the user's onset while the model speaks to where the model stops).
    ``questions``: {``kind`` (arithmetic | counting | visual | typed | background | greeting), ``end`` (sample where
    the user's question ends; a typed one: the first sample of the micro-turn its text arrives in), ``answer`` (the
    canonical answer, plain lowercase words or a background result's digits, with which the model's answer
    utterance starts: "twelve", "thirty two", "red", "one two three", "492"; greetings: "hello"), ``answer_start``
    (sample where the model's answer speech starts), ``interrupted`` (the user talked over it: the answer was cut
    short), ``request`` (background questions: the request, e.g. "123*4")}.

Timing (:mod:`~inference.synth.timeline`): the model's response starts at the first sample of micro-turn ``cue + 1``,
where the cue is the micro-turn holding the user's last speech sample, or the micro-turn in which a typed text or a
background result has been read in full at 4 bytes a micro-turn (marker byte included; the ``tiny`` preset's text
slots). A model utterance the user talks over stops, faded out over 20 ms, at the first sample of micro-turn
``onset + 1``, where ``onset`` holds the user's first speech sample.

Captions (:mod:`~inference.synth.captions`): an utterance's text plus one trailing space is spread over the
micro-turns its audio covers, in proportion to duration, at word boundaries (the word starting at character ``i``
goes to the micro-turn holding sample ``start + ⌊length · i / len⌋``); words after an interruption's cut are dropped.
Background requests (scenario ``background``): the model's filler ("let me check that.") carries
``REQUEST_OPEN + request + REQUEST_CLOSE`` (:mod:`inference.tokenizer`) before its first word, in its first
micro-turn; the result (e.g. "492", what the built-in background model's calculator answers) arrives later in
``background``, and the model then says it.

Determinism: everything is drawn from the two seeds; conversation ``i`` depends on them and ``i`` only (not on
``--workers``), and its files are byte-identical on every run with the same espeak-ng.
"""
