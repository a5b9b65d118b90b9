from flashsale.cli import main

raise SystemExit(main())
