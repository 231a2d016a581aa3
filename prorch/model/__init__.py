"""The model, the lowest layer: what a user declares (``definition``, ``step``, ``mixins``, the
rules of ``schedule_rules`` and ``limit_rules``), what is stored (``records``, ``status``,
``jsonvalue``, ``keys``), the rules every backend evaluates (``due``), the ``registry`` of
classes by name and version, errors, clocks and settings defaults. It imports nothing else of prorch."""
