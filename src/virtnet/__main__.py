from virtnet.cli import main

raise SystemExit(main())
