"""The quickstart demo (data=demo): its synthetic corpus, its data module and its closing check.
It sits above the core packages, which know nothing of it."""
