from samflow.cli import main

raise SystemExit(main())
