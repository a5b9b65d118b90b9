from flashsale.run.cli import main

raise SystemExit(main())
