from dida.cli.main import main

raise SystemExit(main())
