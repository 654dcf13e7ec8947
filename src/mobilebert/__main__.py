from mobilebert.cli import main

raise SystemExit(main())
