from ztagent.cli import main

raise SystemExit(main())
