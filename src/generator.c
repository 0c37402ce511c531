/*
 * generator.c
 *	  Deterministic sample data: customers, products, order lines and
 *	  clickstream events for an online shop, with planted anomalies and
 *	  (in CSV mode) planted malformed rows.
 *
 * Same arguments, same bytes.  Every random choice comes from a
 * counter-based stream seeded by (seed, stream, day), so a day's orders
 * and events do not depend on how output is chunked, and table mode (rows
 * streamed through COPY FROM into the staging tables) and file mode (CSV
 * files in a landing directory) produce the same good rows.  Money is kept
 * in integer cents and timestamps are formatted here in UTC, so no locale,
 * time zone or float-printing setting can change the output.
 *
 * What makes it realistic enough to test analytics on:
 *	- customer activity is skewed (log-normal propensity; customers sign up
 *	  over time and churn), so most buyers buy once and a few buy often;
 *	- demand has a linear trend and weekly seasonality;
 *	- eight categories with different price levels and popularity;
 *	- cancellations, returns, discounts, guest checkouts;
 *	- customers who move (a second version: SCD type 2 material) and
 *	  products whose price changes;
 *	- sessions with funnel drop-off, anonymous visitors, logins mid-session;
 *	- planted spikes and drops recorded in sample_anomaly (ground truth);
 *	- in file mode, corrupted copies of real rows recorded in sample_defect.
 */
#include "postgres.h"

#include <fcntl.h>
#include <math.h>
#include <sys/stat.h>
#include <unistd.h>

#include "access/table.h"
#include "catalog/namespace.h"
#include "catalog/pg_authid.h"
#include "commands/sequence.h"
#include "common/file_perm.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "nodes/makefuncs.h"
#include "storage/fd.h"
#include "utils/acl.h"
#include "utils/builtins.h"
#include "utils/date.h"
#include "utils/lsyscache.h"
#include "utils/rel.h"

#include "copy_source.h"
#include "pg_compat.h"
#include "utils.h"

PG_FUNCTION_INFO_V1(ca_generate_sample_data);

#define SECS_PER_DAY 86400
#define UNIX_DAYS_AT_PG_EPOCH 10957 /* 2000-01-01 - 1970-01-01 */
#define MAX_LINES_PER_ORDER 4
#define HISTORY_DAYS 730		/* customers sign up from two years before */

/* ---------------------------------------------------------------------
 * Random streams: xoshiro256** seeded through splitmix64.
 * ---------------------------------------------------------------------
 */
typedef struct Rng
{
	uint64		s[4];
} Rng;

enum RngStream
{
	STREAM_PRODUCTS = 1,
	STREAM_CUSTOMERS,
	STREAM_ANOMALIES,
	STREAM_ORDERS,
	STREAM_EVENTS,
	STREAM_IDS
};

static inline uint64
splitmix64(uint64 *x)
{
	uint64		z = (*x += UINT64CONST(0x9E3779B97F4A7C15));

	z = (z ^ (z >> 30)) * UINT64CONST(0xBF58476D1CE4E5B9);
	z = (z ^ (z >> 27)) * UINT64CONST(0x94D049BB133111EB);
	return z ^ (z >> 31);
}

static uint64
mix3(uint64 seed, uint64 stream, uint64 index)
{
	uint64		x = seed ^ (stream * UINT64CONST(0xD1B54A32D192ED03));

	x = splitmix64(&x) ^ (index * UINT64CONST(0x8CB92BA72F3D8DD7));
	return splitmix64(&x);
}

static void
rng_init(Rng *r, uint64 seed, uint64 stream, uint64 index)
{
	uint64		x = mix3(seed, stream, index);

	for (int i = 0; i < 4; i++)
		r->s[i] = splitmix64(&x);
}

static inline uint64
rotl64(uint64 x, int k)
{
	return (x << k) | (x >> (64 - k));
}

static uint64
rng_next(Rng *r)
{
	uint64	   *s = r->s;
	uint64		result = rotl64(s[1] * 5, 7) * 9;
	uint64		t = s[1] << 17;

	s[2] ^= s[0];
	s[3] ^= s[1];
	s[1] ^= s[2];
	s[0] ^= s[3];
	s[2] ^= t;
	s[3] = rotl64(s[3], 45);
	return result;
}

/* uniform on [0, 1) with 53 random bits */
static inline double
rng_uniform(Rng *r)
{
	return (double) (rng_next(r) >> 11) * (1.0 / 9007199254740992.0);
}

/* uniform integer on [0, n) */
static inline int
rng_int(Rng *r, int n)
{
	return (int) (rng_uniform(r) * n);
}

static inline bool
rng_chance(Rng *r, double p)
{
	return rng_uniform(r) < p;
}

static double
rng_normal(Rng *r)
{
	double		u1 = 1.0 - rng_uniform(r);	/* (0, 1] */
	double		u2 = rng_uniform(r);

	return sqrt(-2.0 * log(u1)) * cos(2.0 * M_PI * u2);
}

static int
rng_poisson(Rng *r, double lambda)
{
	if (lambda <= 0.0)
		return 0;
	if (lambda < 30.0)
	{
		double		limit = exp(-lambda);
		double		p = 1.0;
		int			k = 0;

		do
		{
			k++;
			p *= rng_uniform(r);
		} while (p > limit);
		return k - 1;
	}
	/* normal approximation is plenty for large means */
	return Max(0, (int) floor(lambda + sqrt(lambda) * rng_normal(r) + 0.5));
}

/* index i with probability weight[i] / total, given cumulative weights */
static int
rng_pick_cumulative(Rng *r, const double *cumulative, int n)
{
	double		target = rng_uniform(r) * cumulative[n - 1];
	int			lo = 0,
				hi = n - 1;

	while (lo < hi)
	{
		int			mid = (lo + hi) / 2;

		if (cumulative[mid] > target)
			hi = mid;
		else
			lo = mid + 1;
	}
	return lo;
}

/* index into a small fixed table of integer weights */
static int
rng_pick_small(Rng *r, const int *weights, int n)
{
	int			total = 0;
	int			target;

	for (int i = 0; i < n; i++)
		total += weights[i];
	target = rng_int(r, total);
	for (int i = 0; i < n; i++)
	{
		if (target < weights[i])
			return i;
		target -= weights[i];
	}
	return n - 1;
}

/* ---------------------------------------------------------------------
 * The shop's fixed vocabulary.
 * ---------------------------------------------------------------------
 */
typedef struct CategorySpec
{
	const char *name;
	double		share;			/* of order lines */
	double		median_price;
	double		price_sigma;	/* log-normal spread of list prices */
	const char *subcategories[4];
	const char *nouns[6];
} CategorySpec;

static const CategorySpec categories[] = {
	{"Electronics", 0.12, 180.0, 0.80,
		{"Audio", "Phones", "Computers", "Accessories"},
	{"Headphones", "Smartphone", "Laptop Stand", "Charger", "Speaker", "Smartwatch"}},
	{"Home & Kitchen", 0.15, 45.0, 0.60,
		{"Cookware", "Decor", "Storage", "Appliances"},
	{"Skillet", "Vase", "Storage Box", "Blender", "Saucepan", "Lamp"}},
	{"Clothing", 0.20, 35.0, 0.50,
		{"Women", "Men", "Kids", "Shoes"},
	{"Dress", "Shirt", "Hoodie", "Sneakers", "Jacket", "Jeans"}},
	{"Books", 0.12, 16.0, 0.35,
		{"Fiction", "Non-fiction", "Children", "Comics"},
	{"Novel", "Cookbook", "Picture Book", "Graphic Novel", "Thriller", "Field Guide"}},
	{"Beauty", 0.11, 22.0, 0.50,
		{"Skincare", "Makeup", "Hair", "Fragrance"},
	{"Face Serum", "Lipstick", "Shampoo", "Eau de Parfum", "Night Cream", "Mascara"}},
	{"Sports & Outdoors", 0.10, 55.0, 0.70,
		{"Fitness", "Camping", "Cycling", "Team Sports"},
	{"Yoga Mat", "Tent", "Bike Light", "Football", "Dumbbells", "Sleeping Bag"}},
	{"Toys & Games", 0.09, 28.0, 0.55,
		{"Board Games", "Puzzles", "Building", "Outdoor"},
	{"Board Game", "Jigsaw Puzzle", "Building Set", "Kite", "Card Game", "Water Blaster"}},
	{"Grocery", 0.11, 9.0, 0.45,
		{"Coffee & Tea", "Snacks", "Pantry", "Beverages"},
	{"Coffee Beans", "Granola", "Olive Oil", "Sparkling Water", "Green Tea", "Dark Chocolate"}},
};

#define N_CATEGORIES lengthof(categories)

static const char *const adjectives[] = {
	"Classic", "Premium", "Eco", "Compact", "Deluxe", "Essential",
	"Smart", "Vintage", "Ultra", "Everyday", "Pro", "Organic"
};

typedef struct NameSpec
{
	const char *display;		/* as written (may be UTF-8) */
	const char *ascii;			/* for e-mail addresses */
} NameSpec;

static const NameSpec first_names[] = {
	{"Olivia", "olivia"}, {"Liam", "liam"}, {"Emma", "emma"}, {"Noah", "noah"},
	{"Ava", "ava"}, {"Lucas", "lucas"}, {"Sophia", "sophia"}, {"Mateo", "mateo"},
	{"Isabella", "isabella"}, {"Ethan", "ethan"}, {"Mia", "mia"}, {"James", "james"},
	{"Amelia", "amelia"}, {"Benjamin", "benjamin"}, {"Harper", "harper"},
	{"Elijah", "elijah"}, {"Evelyn", "evelyn"}, {"Henry", "henry"}, {"Chloé", "chloe"},
	{"José", "jose"}, {"Zoë", "zoe"}, {"Søren", "soren"}, {"Aisha", "aisha"},
	{"Kenji", "kenji"}, {"Priya", "priya"}, {"Omar", "omar"}, {"Lena", "lena"},
	{"Mateus", "mateus"}, {"Ana", "ana"}, {"Daniel", "daniel"}, {"Grace", "grace"},
	{"Samuel", "samuel"}, {"Nora", "nora"}, {"David", "david"}, {"Lily", "lily"},
	{"Wei", "wei"}, {"Fatima", "fatima"}, {"Hugo", "hugo"}, {"Ingrid", "ingrid"},
	{"Marco", "marco"}
};

static const NameSpec last_names[] = {
	{"Smith", "smith"}, {"Johnson", "johnson"}, {"Williams", "williams"},
	{"Brown", "brown"}, {"Jones", "jones"}, {"Garcia", "garcia"},
	{"Miller", "miller"}, {"Davis", "davis"}, {"Rodriguez", "rodriguez"},
	{"Martinez", "martinez"}, {"Wilson", "wilson"}, {"Anderson", "anderson"},
	{"Taylor", "taylor"}, {"Thomas", "thomas"}, {"Moore", "moore"},
	{"Martin", "martin"}, {"Lee", "lee"}, {"Walker", "walker"}, {"Hall", "hall"},
	{"Müller", "mueller"}, {"O'Brien", "obrien"}, {"Nguyen", "nguyen"},
	{"Silva", "silva"}, {"Kowalski", "kowalski"}, {"Dubois", "dubois"},
	{"Rossi", "rossi"}, {"Tanaka", "tanaka"}, {"Patel", "patel"},
	{"Hansen", "hansen"}, {"Novak", "novak"}, {"Costa", "costa"},
	{"Schmidt", "schmidt"}, {"García-López", "garcialopez"}, {"Kim", "kim"},
	{"Wright", "wright"}, {"King", "king"}
};

typedef struct CitySpec
{
	const char *city;
	const char *state;
	const char *country;
} CitySpec;

static const CitySpec cities[] = {
	{"New York", "NY", "US"}, {"Los Angeles", "CA", "US"}, {"Chicago", "IL", "US"},
	{"Houston", "TX", "US"}, {"London", "England", "GB"}, {"Phoenix", "AZ", "US"},
	{"Toronto", "ON", "CA"}, {"Philadelphia", "PA", "US"}, {"Berlin", "BE", "DE"},
	{"San Diego", "CA", "US"}, {"Dallas", "TX", "US"}, {"Paris", "IDF", "FR"},
	{"Austin", "TX", "US"}, {"Seattle", "WA", "US"}, {"Manchester", "England", "GB"},
	{"Denver", "CO", "US"}, {"Boston", "MA", "US"}, {"São Paulo", "SP", "BR"},
	{"Vancouver", "BC", "CA"}, {"Madrid", "MD", "ES"}, {"Portland", "OR", "US"},
	{"Atlanta", "GA", "US"}, {"Miami", "FL", "US"}, {"München", "BY", "DE"},
	{"Sydney", "NSW", "AU"}, {"Minneapolis", "MN", "US"}, {"Montréal", "QC", "CA"},
	{"Barcelona", "CT", "ES"}, {"Nashville", "TN", "US"}, {"Edinburgh", "Scotland", "GB"},
	{"Lyon", "ARA", "FR"}, {"Melbourne", "VIC", "AU"}, {"Hamburg", "HH", "DE"},
	{"Rio de Janeiro", "RJ", "BR"}, {"Washington, D.C.", "DC", "US"}
};

/* order/session attributes: names and weights */
static const char *const order_channels[] = {"web", "mobile_app", "marketplace"};
static const int order_channel_weights[] = {55, 35, 10};
static const char *const statuses[] = {"completed", "cancelled", "returned"};
static const int status_weights[] = {91, 5, 4};
static const char *const traffic_sources[] = {
	"direct", "organic_search", "paid_search", "email", "social", "referral"
};
static const int traffic_source_weights[] = {30, 25, 15, 12, 10, 8};
static const char *const devices[] = {"desktop", "mobile_web", "tablet", "app"};
static const int browse_device_weights[] = {42, 38, 8, 12};
static const int web_device_weights[] = {60, 32, 8, 0};
static const int lines_per_order_weights[] = {55, 25, 12, 8};
static const int quantity_weights[] = {72, 18, 6, 2, 2};
static const int discount_percents[] = {5, 10, 15, 20, 25};

/* order and session start hours, peaking in the evening */
static const int hour_weights[24] = {
	2, 1, 1, 1, 1, 2, 3, 5, 7, 8, 9, 9, 10, 9, 9, 9, 10, 11, 13, 15, 16, 14, 9, 5
};

/* ISO day of week (Monday first); averages to 1 */
static const double weekday_factor[7] = {1.08, 1.04, 1.00, 0.97, 0.90, 0.86, 1.15};

/* ---------------------------------------------------------------------
 * The generated world.
 * ---------------------------------------------------------------------
 */
typedef struct GenProduct
{
	int			category;
	int			noun;
	int			adjective;
	int			model;
	int			variant;		/* 0 plain, 1 with a comma, 2 with quotes */
	int64		price_cents;
	int64		cost_cents;
	int64		new_price_cents;	/* after a price change */
	int			price_change_day;	/* -1: never */
} GenProduct;

typedef struct GenCustomer
{
	int			signup_day;		/* relative to start_date; may be < 0 */
	int			signup_sec;
	int			churn_day;		/* no orders after this day */
	int			move_day;		/* -1: never moves */
	int			move_sec;
	int			first;
	int			last;
	int			city;
	int			new_city;
	bool		new_email;
	double		weight;			/* purchase propensity */
} GenCustomer;

typedef struct GenAnomaly
{
	int			day;
	int			category;		/* -1: every category (the shop as a whole) */
	double		factor;
} GenAnomaly;

typedef struct GenOrderLine
{
	int			product;
	int			quantity;
	int64		unit_price_cents;
	int64		discount_cents;
} GenOrderLine;

typedef struct GenOrder
{
	int64		ts;				/* unix seconds */
	int			seq;			/* generation order, breaks timestamp ties */
	int			customer;		/* -1: guest checkout */
	int			status;
	int			channel;
	int			nlines;
	GenOrderLine lines[MAX_LINES_PER_ORDER];
} GenOrder;

typedef enum GenTable
{
	T_CUSTOMERS,
	T_PRODUCTS,
	T_ORDERS,
	T_EVENTS,
	N_TABLES
} GenTable;

static const char *const table_names[N_TABLES] = {
	"customers", "products", "orders", "events"
};

static const char *const table_columns[N_TABLES] = {
	"customer_id,name,email,city,state,country,signup_date,updated_at",
	"product_id,name,category,subcategory,unit_cost,list_price,updated_at",
	"order_id,line_number,customer_id,product_id,order_ts,quantity,unit_price,discount,status,channel",
	"event_id,event_ts,customer_id,session_id,event_type,product_id,order_id,channel,device"
};

/* A malformed row to plant: a corrupted copy of a real row. */
typedef enum DefectAction
{
	DEFECT_REPLACE,				/* replace one field's text */
	DEFECT_EXTRA_FIELD,			/* add a field */
	DEFECT_DROP_FIELDS			/* drop the last two fields */
} DefectAction;

typedef struct DefectSpec
{
	GenTable	table;
	const char *kind;
	DefectAction action;
	int			field;
	const char *value;
} DefectSpec;

static const DefectSpec defect_specs[] = {
	{T_CUSTOMERS, "missing_id", DEFECT_REPLACE, 0, ""},
	{T_CUSTOMERS, "bad_date", DEFECT_REPLACE, 6, "2025-02-30"},
	{T_PRODUCTS, "text_in_numeric", DEFECT_REPLACE, 5, "N/A"},
	{T_ORDERS, "bad_timestamp", DEFECT_REPLACE, 4, "2025-02-30 12:00:00+00"},
	{T_ORDERS, "text_in_numeric", DEFECT_REPLACE, 5, "two"},
	{T_ORDERS, "missing_id", DEFECT_REPLACE, 0, ""},
	{T_ORDERS, "wrong_column_count", DEFECT_EXTRA_FIELD, 0, "EXTRA"},
	{T_ORDERS, "check_violation", DEFECT_REPLACE, 8, "shipped"},
	{T_EVENTS, "bad_timestamp", DEFECT_REPLACE, 1, "not a timestamp"},
	{T_EVENTS, "check_violation", DEFECT_REPLACE, 4, "scroll"},
	{T_EVENTS, "wrong_column_count", DEFECT_DROP_FIELDS, 0, NULL},
};

typedef struct Generator
{
	uint64		seed;
	int			ncustomers;
	int			nproducts;
	int			ndays;
	int64		start_unix_day; /* days since 1970-01-01 */
	int			nmonths;		/* calendar months touched by the period */
	int			first_month_key;	/* year * 12 + month - 1 of start */

	GenProduct *products;
	double	   *product_cumulative[N_CATEGORIES];	/* popularity within
													 * category */
	int		   *category_products[N_CATEGORIES];
	int			category_nproducts[N_CATEGORIES];

	GenCustomer *customers;
	int		   *by_signup;		/* customer indexes sorted by signup day */
	int		   *sorted_signup_days;
	double	   *signup_cumulative;	/* propensity, in by_signup order */

	GenAnomaly *anomalies;
	int			nanomalies;

	/* reusable per-day order buffer */
	GenOrder   *orders;
	int			orders_capacity;
} Generator;

/* ---------------------------------------------------------------------
 * Calendar helpers (proleptic Gregorian, UTC).
 * ---------------------------------------------------------------------
 */
static void
civil_from_unix_days(int64 z, int *year, int *month, int *day)
{
	int64		era;
	int64		doe,
				yoe,
				doy,
				mp;

	z += 719468;
	era = (z >= 0 ? z : z - 146096) / 146097;
	doe = z - era * 146097;
	yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
	doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
	mp = (5 * doy + 2) / 153;
	*day = (int) (doy - (153 * mp + 2) / 5 + 1);
	*month = (int) (mp < 10 ? mp + 3 : mp - 9);
	*year = (int) (yoe + era * 400 + (*month <= 2));
}

/* ISO day of week index, 0 = Monday; 1970-01-01 was a Thursday */
static int
weekday_index(int64 unix_day)
{
	int64		w = (unix_day + 3) % 7;

	return (int) (w < 0 ? w + 7 : w);
}

static int
month_key_of_unix_day(int64 unix_day)
{
	int			y,
				m,
				d;

	civil_from_unix_days(unix_day, &y, &m, &d);
	return y * 12 + (m - 1);
}

/* month index (0 .. nmonths-1) of a day relative to start; clamps */
static int
month_index(const Generator *g, int rel_day)
{
	int			idx = month_key_of_unix_day(g->start_unix_day + rel_day) - g->first_month_key;

	return Max(0, Min(idx, g->nmonths - 1));
}

static void
append_date(StringInfo buf, int64 unix_day)
{
	int			y,
				m,
				d;

	civil_from_unix_days(unix_day, &y, &m, &d);
	appendStringInfo(buf, "%04d-%02d-%02d", y, m, d);
}

static void
append_timestamp(StringInfo buf, int64 unix_secs)
{
	int64		day = unix_secs >= 0 ? unix_secs / SECS_PER_DAY
	: -((-unix_secs + SECS_PER_DAY - 1) / SECS_PER_DAY);
	int			secs = (int) (unix_secs - day * SECS_PER_DAY);

	append_date(buf, day);
	appendStringInfo(buf, " %02d:%02d:%02d+00",
					 secs / 3600, (secs / 60) % 60, secs % 60);
}

static void
append_cents(StringInfo buf, int64 cents)
{
	appendStringInfo(buf, "%s" INT64_FORMAT ".%02d",
					 cents < 0 ? "-" : "", Abs(cents) / 100, (int) (Abs(cents) % 100));
}

/* ---------------------------------------------------------------------
 * Building the world.
 * ---------------------------------------------------------------------
 */
static int64
round_price_cents(double price)
{
	/* shop prices end in .99 */
	int64		whole = (int64) floor(price + 0.5);

	return Max(1, whole) * 100 - 1;
}

static void
build_products(Generator *g)
{
	Rng			r;
	double		category_cumulative[N_CATEGORIES];
	double		acc = 0.0;

	rng_init(&r, g->seed, STREAM_PRODUCTS, 0);
	for (int c = 0; c < N_CATEGORIES; c++)
	{
		acc += categories[c].share;
		category_cumulative[c] = acc;
		g->category_nproducts[c] = 0;
	}

	g->products = palloc0(sizeof(GenProduct) * g->nproducts);
	for (int i = 0; i < g->nproducts; i++)
	{
		GenProduct *p = &g->products[i];
		const CategorySpec *cat;
		double		price;

		/* the first N_CATEGORIES products seed every category */
		p->category = i < N_CATEGORIES ? i
			: rng_pick_cumulative(&r, category_cumulative, N_CATEGORIES);
		cat = &categories[p->category];
		p->noun = rng_int(&r, lengthof(cat->nouns));
		p->adjective = rng_int(&r, lengthof(adjectives));
		p->model = 10 + rng_int(&r, 90);
		p->variant = (i % 37 == 5) ? 1 : (i % 53 == 7) ? 2 : 0;
		price = cat->median_price * exp(cat->price_sigma * rng_normal(&r));
		p->price_cents = round_price_cents(price);
		p->cost_cents = (int64) floor(p->price_cents * (0.35 + 0.3 * rng_uniform(&r)));
		p->price_change_day = -1;
		if (g->ndays > 60 && rng_chance(&r, 0.06))
		{
			p->price_change_day = 30 + rng_int(&r, g->ndays - 30);
			p->new_price_cents = round_price_cents(p->price_cents / 100.0 *
												   (0.85 + 0.35 * rng_uniform(&r)));
		}
		g->category_nproducts[p->category]++;
	}

	/* popularity within a category falls off with rank (Zipf-like) */
	for (int c = 0; c < N_CATEGORIES; c++)
	{
		int			n = 0;

		g->category_products[c] = palloc(sizeof(int) * g->category_nproducts[c]);
		g->product_cumulative[c] = palloc(sizeof(double) * g->category_nproducts[c]);
		acc = 0.0;
		for (int i = 0; i < g->nproducts; i++)
		{
			if (g->products[i].category != c)
				continue;
			acc += 1.0 / pow(n + 1.0, 0.9);
			g->category_products[c][n] = i;
			g->product_cumulative[c][n] = acc;
			n++;
		}
	}
}

static int
compare_by_signup(const void *a, const void *b, void *arg)
{
	const GenCustomer *customers = arg;
	int			ia = *(const int *) a;
	int			ib = *(const int *) b;

	if (customers[ia].signup_day != customers[ib].signup_day)
		return customers[ia].signup_day < customers[ib].signup_day ? -1 : 1;
	return ia < ib ? -1 : ia > ib ? 1 : 0;
}

static void
build_customers(Generator *g)
{
	Rng			r;
	int			span = HISTORY_DAYS + g->ndays;
	double		acc = 0.0;

	rng_init(&r, g->seed, STREAM_CUSTOMERS, 0);
	g->customers = palloc0(sizeof(GenCustomer) * g->ncustomers);
	for (int i = 0; i < g->ncustomers; i++)
	{
		GenCustomer *c = &g->customers[i];
		int			move_from;

		/* sign-ups accelerate over time: density grows linearly */
		c->signup_day = -HISTORY_DAYS + (int) floor(span * sqrt(rng_uniform(&r)));
		c->signup_sec = rng_int(&r, SECS_PER_DAY);
		c->churn_day = c->signup_day + (int) floor(-420.0 * log(1.0 - rng_uniform(&r)));
		c->first = rng_int(&r, lengthof(first_names));
		c->last = rng_int(&r, lengthof(last_names));
		/* bigger cities are more likely */
		c->city = (int) floor(lengthof(cities) * pow(rng_uniform(&r), 1.6));
		c->weight = exp(1.3 * rng_normal(&r));
		c->move_day = -1;
		move_from = Max(c->signup_day + 30, 1);
		if (move_from < g->ndays && rng_chance(&r, 0.07))
		{
			c->move_day = move_from + rng_int(&r, g->ndays - move_from);
			c->move_sec = rng_int(&r, SECS_PER_DAY);
			c->new_city = (c->city + 1 + rng_int(&r, lengthof(cities) - 1)) % lengthof(cities);
			c->new_email = rng_chance(&r, 0.3);
		}
	}

	g->by_signup = palloc(sizeof(int) * g->ncustomers);
	g->sorted_signup_days = palloc(sizeof(int) * g->ncustomers);
	g->signup_cumulative = palloc(sizeof(double) * g->ncustomers);
	for (int i = 0; i < g->ncustomers; i++)
		g->by_signup[i] = i;
	qsort_arg(g->by_signup, g->ncustomers, sizeof(int), compare_by_signup, g->customers);
	for (int i = 0; i < g->ncustomers; i++)
	{
		const GenCustomer *c = &g->customers[g->by_signup[i]];

		acc += c->weight;
		g->signup_cumulative[i] = acc;
		g->sorted_signup_days[i] = c->signup_day;
	}
}

static bool
anomaly_too_close(const Generator *g, int day)
{
	for (int i = 0; i < g->nanomalies; i++)
		if (Abs(g->anomalies[i].day - day) < 5)
			return true;
	return false;
}

/*
 * Plant spikes (a flash sale in one category), category drops (a category
 * out of stock) and shop-wide drops (an outage), well after the start so
 * that detectors have history, and at least five days apart.
 */
static void
build_anomalies(Generator *g)
{
	Rng			r;
	int			nspikes = g->ndays / 60;
	int			ncategory_drops = g->ndays / 120;
	int			ntotal_drops = g->ndays / 150;
	int			wanted = nspikes + ncategory_drops + ntotal_drops;
	int			first_day = 35;
	int			attempts = 0;

	rng_init(&r, g->seed, STREAM_ANOMALIES, 0);
	g->anomalies = palloc0(sizeof(GenAnomaly) * Max(wanted, 1));
	g->nanomalies = 0;
	if (g->ndays - 1 <= first_day)
		return;
	while (g->nanomalies < wanted && attempts++ < 10000)
	{
		int			day = first_day + rng_int(&r, g->ndays - 1 - first_day);
		GenAnomaly *a = &g->anomalies[g->nanomalies];
		int			k = g->nanomalies;

		if (anomaly_too_close(g, day))
			continue;
		a->day = day;
		if (k < nspikes)
		{
			a->category = rng_int(&r, N_CATEGORIES);
			a->factor = 3.0 + rng_uniform(&r);
		}
		else if (k < nspikes + ncategory_drops)
		{
			/* only the two biggest categories sell enough to see a drop */
			a->category = rng_chance(&r, 0.5) ? 2 : 1;
			a->factor = 0.05 * rng_uniform(&r);
		}
		else
		{
			a->category = -1;
			a->factor = 0.25 + 0.15 * rng_uniform(&r);
		}
		g->nanomalies++;
	}
}

static double
anomaly_factor(const Generator *g, int category, int day)
{
	double		f = 1.0;

	for (int i = 0; i < g->nanomalies; i++)
		if (g->anomalies[i].day == day &&
			(g->anomalies[i].category == category || g->anomalies[i].category == -1))
			f *= g->anomalies[i].factor;
	return f;
}

/* expected orders on a day before anomalies: trend times weekly season */
static double
base_orders(const Generator *g, int day)
{
	return g->ncustomers * 0.0075 * (1.0 + 0.35 * day / 365.0) *
		weekday_factor[weekday_index(g->start_unix_day + day)];
}

/* a random customer who signed up before the day and has not churned */
static int
pick_customer(const Generator *g, Rng *r, int day)
{
	int			lo = 0,
				hi = g->ncustomers;
	int			eligible;
	int			c = -1;

	/* eligible = number of customers with signup_day < day */
	while (lo < hi)
	{
		int			mid = (lo + hi) / 2;

		if (g->sorted_signup_days[mid] < day)
			lo = mid + 1;
		else
			hi = mid;
	}
	eligible = lo;
	if (eligible == 0)
		return -1;
	for (int attempt = 0; attempt < 16; attempt++)
	{
		c = g->by_signup[rng_pick_cumulative(r, g->signup_cumulative, eligible)];
		if (day <= g->customers[c].churn_day)
			break;
	}
	return c;
}

static int
pick_product(const Generator *g, Rng *r, int category)
{
	int			k = rng_pick_cumulative(r, g->product_cumulative[category],
										g->category_nproducts[category]);

	return g->category_products[category][k];
}

static int64
product_price(const Generator *g, int product, int day)
{
	const GenProduct *p = &g->products[product];

	if (p->price_change_day >= 0 && day >= p->price_change_day)
		return p->new_price_cents;
	return p->price_cents;
}

static int
compare_orders_by_ts(const void *a, const void *b)
{
	const GenOrder *oa = a;
	const GenOrder *ob = b;

	if (oa->ts != ob->ts)
		return oa->ts < ob->ts ? -1 : 1;
	return oa->seq < ob->seq ? -1 : oa->seq > ob->seq ? 1 : 0;
}

/* Simulate one day's orders into g->orders, sorted by time. */
static int
simulate_orders(Generator *g, int day)
{
	Rng			r;
	double		weights[N_CATEGORIES];
	double		cumulative[N_CATEGORIES];
	double		share_cumulative[N_CATEGORIES];
	double		total = 0.0,
				share_acc = 0.0;
	int64		day_start = (g->start_unix_day + day) * SECS_PER_DAY;
	int			norders;

	rng_init(&r, g->seed, STREAM_ORDERS, (uint64) day);
	for (int c = 0; c < N_CATEGORIES; c++)
	{
		weights[c] = categories[c].share * anomaly_factor(g, c, day);
		total += weights[c];
		cumulative[c] = total;
		share_acc += categories[c].share;
		share_cumulative[c] = share_acc;
	}
	norders = rng_poisson(&r, base_orders(g, day) * total);
	if (norders > g->orders_capacity)
	{
		g->orders_capacity = Max(norders, g->orders_capacity * 2);
		g->orders = repalloc(g->orders, sizeof(GenOrder) * g->orders_capacity);
	}

	for (int i = 0; i < norders; i++)
	{
		GenOrder   *o = &g->orders[i];
		int			primary = rng_pick_cumulative(&r, cumulative, N_CATEGORIES);

		o->seq = i;
		o->ts = day_start + rng_pick_small(&r, hour_weights, 24) * 3600 + rng_int(&r, 3600);
		o->customer = rng_chance(&r, 0.04) ? -1 : pick_customer(g, &r, day);
		o->status = rng_pick_small(&r, status_weights, lengthof(status_weights));
		o->channel = rng_pick_small(&r, order_channel_weights, lengthof(order_channel_weights));
		o->nlines = 1 + rng_pick_small(&r, lines_per_order_weights, MAX_LINES_PER_ORDER);
		for (int l = 0; l < o->nlines; l++)
		{
			GenOrderLine *line = &o->lines[l];
			int			category = (l == 0 || rng_chance(&r, 0.6)) ? primary
			: rng_pick_cumulative(&r, share_cumulative, N_CATEGORIES);

			line->product = pick_product(g, &r, category);
			line->quantity = 1 + rng_pick_small(&r, quantity_weights, lengthof(quantity_weights));
			line->unit_price_cents = product_price(g, line->product, day);
			line->discount_cents = 0;
			if (rng_chance(&r, 0.18))
			{
				int			pct = discount_percents[rng_int(&r, lengthof(discount_percents))];

				line->discount_cents = (line->quantity * line->unit_price_cents * pct + 50) / 100;
			}
		}
	}
	qsort(g->orders, norders, sizeof(GenOrder), compare_orders_by_ts);
	return norders;
}

/* ---------------------------------------------------------------------
 * Output: CSV records into a buffer (table mode) or a file (file mode).
 * ---------------------------------------------------------------------
 */
#define MAX_FIELDS 12

typedef struct PlantedDefect
{
	const DefectSpec *spec;
	char	   *file;
	int64		line;
} PlantedDefect;

typedef struct GenOutput
{
	StringInfo	buf;			/* where records go */
	const char *load_id;		/* table mode: appended to every record */

	/* file mode */
	int			fd;				/* -1: no file open (or table mode) */
	char	   *path;
	int64		line;			/* lines written to the current file */
	int64		file_rows;		/* good rows in the current file */
	const DefectSpec *pending[lengthof(defect_specs)];
	int			npending;		/* defects still to plant in this file */
	int			nplanted;		/* defects planted in this file */

	int64		rows;			/* good rows written, all files */
	int			files;
	List	   *planted;		/* PlantedDefect * */
} GenOutput;

typedef struct Record
{
	int			nfields;
	StringInfoData field[MAX_FIELDS];
	bool		isnull[MAX_FIELDS];
} Record;

static void
record_init(Record *rec)
{
	for (int i = 0; i < MAX_FIELDS; i++)
		initStringInfo(&rec->field[i]);
}

static void
record_reset(Record *rec)
{
	rec->nfields = 0;
}

/* start the next field and return its buffer */
static StringInfo
record_next(Record *rec)
{
	StringInfo	f = &rec->field[rec->nfields];

	Assert(rec->nfields < MAX_FIELDS);
	resetStringInfo(f);
	rec->isnull[rec->nfields] = false;
	rec->nfields++;
	return f;
}

static void
record_text(Record *rec, const char *s)
{
	appendStringInfoString(record_next(rec), s);
}

static void
record_null(Record *rec)
{
	record_next(rec);
	rec->isnull[rec->nfields - 1] = true;
}

/* RFC 4180: quote fields holding the delimiter, quotes or line breaks */
static void
append_csv_field(StringInfo out, const char *s, bool isnull)
{
	if (isnull)
		return;
	if (s[0] == '\0' || strpbrk(s, ",\"\r\n") != NULL)
	{
		appendStringInfoChar(out, '"');
		for (const char *p = s; *p; p++)
		{
			if (*p == '"')
				appendStringInfoChar(out, '"');
			appendStringInfoChar(out, *p);
		}
		appendStringInfoChar(out, '"');
	}
	else
		appendStringInfoString(out, s);
}

static void
write_record(GenOutput *out, Record *rec, const DefectSpec *defect)
{
	int			n = rec->nfields;

	if (defect && defect->action == DEFECT_DROP_FIELDS)
		n -= 2;
	for (int i = 0; i < n; i++)
	{
		if (i > 0)
			appendStringInfoChar(out->buf, ',');
		if (defect && defect->action == DEFECT_REPLACE && defect->field == i)
			append_csv_field(out->buf, defect->value, defect->value[0] == '\0');
		else
			append_csv_field(out->buf, rec->field[i].data, rec->isnull[i]);
	}
	if (defect && defect->action == DEFECT_EXTRA_FIELD)
		appendStringInfo(out->buf, ",%s", defect->value);
	if (out->load_id)
		appendStringInfo(out->buf, ",%s", out->load_id);
	appendStringInfoChar(out->buf, '\n');
}

static void
flush_file_buffer(GenOutput *out)
{
	if (out->fd < 0 || out->buf->len == 0)
		return;
	for (int done = 0; done < out->buf->len;)
	{
		ssize_t		n = write(out->fd, out->buf->data + done, out->buf->len - done);

		if (n < 0 && errno == EINTR)
		{
			CHECK_FOR_INTERRUPTS();
			continue;
		}
		if (n <= 0)
		{
			/* a short write without an error means no space left */
			if (n == 0)
				errno = ENOSPC;
			ereport(ERROR,
					(errcode_for_file_access(),
					 errmsg("could not write sample data file \"%s\": %m", out->path)));
		}
		done += n;
	}
	resetStringInfo(out->buf);
}

static void
plant_defect(GenOutput *out, Record *rec)
{
	PlantedDefect *pd = palloc(sizeof(PlantedDefect));

	pd->spec = out->pending[0];
	pd->file = pstrdup(out->path);
	pd->line = ++out->line;
	write_record(out, rec, pd->spec);
	out->planted = lappend(out->planted, pd);
	memmove(&out->pending[0], &out->pending[1], sizeof(out->pending[0]) * (out->npending - 1));
	out->npending--;
	out->nplanted++;
}

/*
 * Emit one good record.  In file mode a pending defect is planted as a
 * corrupted copy of the record just after it, at spaced-out positions so
 * that good rows surround every bad one.
 */
static void
emit_record(GenOutput *out, Record *rec)
{
	write_record(out, rec, NULL);
	out->rows++;
	if (out->fd >= 0)
	{
		out->line++;
		out->file_rows++;
		if (out->npending > 0 && out->line >= 4 + 9 * (int64) out->nplanted)
			plant_defect(out, rec);
		if (out->buf->len >= 65536)
			flush_file_buffer(out);
	}
}

/* ---------------------------------------------------------------------
 * Per-table emitters.  A unit is a month (customers, products) or a day
 * (orders, events); units are emitted in order.
 * ---------------------------------------------------------------------
 */
static void
customer_email(StringInfo buf, const GenCustomer *c, int index, bool second)
{
	appendStringInfo(buf, "%s.%s%d%s@example.com",
					 first_names[c->first].ascii, last_names[c->last].ascii,
					 index + 1, second ? ".new" : "");
}

static void
emit_customer_version(GenOutput *out, Record *rec, const Generator *g, int i, bool moved)
{
	const GenCustomer *c = &g->customers[i];
	const CitySpec *city = &cities[moved ? c->new_city : c->city];
	int64		day = g->start_unix_day + (moved ? c->move_day : c->signup_day);
	int			sec = moved ? c->move_sec : c->signup_sec;

	record_reset(rec);
	appendStringInfo(record_next(rec), "C%07d", i + 1);
	appendStringInfo(record_next(rec), "%s %s",
					 first_names[c->first].display, last_names[c->last].display);
	customer_email(record_next(rec), c, i, moved && c->new_email);
	record_text(rec, city->city);
	record_text(rec, city->state);
	record_text(rec, city->country);
	append_date(record_next(rec), g->start_unix_day + c->signup_day);
	append_timestamp(record_next(rec), day * SECS_PER_DAY + sec);
	emit_record(out, rec);
}

/* customers whose version became known in the given month */
static void
emit_customers_month(Generator *g, int month, GenOutput *out, Record *rec)
{
	for (int i = 0; i < g->ncustomers; i++)
	{
		const GenCustomer *c = &g->customers[i];

		if (c->signup_day < g->ndays && month_index(g, c->signup_day) == month)
			emit_customer_version(out, rec, g, i, false);
		if (c->move_day >= 0 && month_index(g, c->move_day) == month)
			emit_customer_version(out, rec, g, i, true);
	}
}

static void
emit_product_version(GenOutput *out, Record *rec, const Generator *g, int i, bool changed)
{
	const GenProduct *p = &g->products[i];
	const CategorySpec *cat = &categories[p->category];
	int64		day = g->start_unix_day + (changed ? p->price_change_day : -1);
	StringInfo	name;

	record_reset(rec);
	appendStringInfo(record_next(rec), "P%05d", i + 1);
	name = record_next(rec);
	if (p->variant == 2)
		appendStringInfo(name, "%s \"%s\" %c%d", adjectives[p->adjective],
						 cat->nouns[p->noun], 'A' + p->model % 26, p->model);
	else
		appendStringInfo(name, "%s %s %c%d%s", adjectives[p->adjective],
						 cat->nouns[p->noun], 'A' + p->model % 26, p->model,
						 p->variant == 1 ? ", 2-pack" : "");
	record_text(rec, cat->name);
	record_text(rec, cat->subcategories[p->noun % 4]);
	append_cents(record_next(rec), p->cost_cents);
	append_cents(record_next(rec), changed ? p->new_price_cents : p->price_cents);
	append_timestamp(record_next(rec), day * SECS_PER_DAY + 6 * 3600);
	emit_record(out, rec);
}

/* the catalogue in the first month, price changes when they happen */
static void
emit_products_month(Generator *g, int month, GenOutput *out, Record *rec)
{
	for (int i = 0; i < g->nproducts; i++)
	{
		const GenProduct *p = &g->products[i];

		if (month == 0)
			emit_product_version(out, rec, g, i, false);
		if (p->price_change_day >= 0 && month_index(g, p->price_change_day) == month)
			emit_product_version(out, rec, g, i, true);
	}
}

static void
append_order_id(StringInfo buf, const Generator *g, int day, int seq)
{
	int			y,
				m,
				d;

	civil_from_unix_days(g->start_unix_day + day, &y, &m, &d);
	appendStringInfo(buf, "O%04d%02d%02d-%05d", y, m, d, seq + 1);
}

static void
emit_orders_day(Generator *g, int day, GenOutput *out, Record *rec)
{
	int			norders = simulate_orders(g, day);

	for (int i = 0; i < norders; i++)
	{
		const GenOrder *o = &g->orders[i];

		for (int l = 0; l < o->nlines; l++)
		{
			const GenOrderLine *line = &o->lines[l];

			record_reset(rec);
			append_order_id(record_next(rec), g, day, i);
			appendStringInfo(record_next(rec), "%d", l + 1);
			if (o->customer >= 0)
				appendStringInfo(record_next(rec), "C%07d", o->customer + 1);
			else
				record_null(rec);
			appendStringInfo(record_next(rec), "P%05d", line->product + 1);
			append_timestamp(record_next(rec), o->ts);
			appendStringInfo(record_next(rec), "%d", line->quantity);
			append_cents(record_next(rec), line->unit_price_cents);
			append_cents(record_next(rec), line->discount_cents);
			record_text(rec, statuses[o->status]);
			record_text(rec, order_channels[o->channel]);
			emit_record(out, rec);
		}
	}
}

typedef struct SessionContext
{
	GenOutput  *out;
	Record	   *rec;
	const Generator *g;
	int			day;
	uint64		event_seq;		/* per-day counter behind event ids */
	uint64		session_seq;
	char		session_id[24];
	int			source;
	int			device;
} SessionContext;

static void
start_session(SessionContext *s, Rng *r, int device)
{
	snprintf(s->session_id, sizeof(s->session_id), "ss-%016llx",
			 (unsigned long long) mix3(s->g->seed, STREAM_IDS,
									   ((uint64) s->day << 32) | (s->session_seq++ << 1) | 1));
	s->source = rng_pick_small(r, traffic_source_weights, lengthof(traffic_source_weights));
	s->device = device;
}

static void
emit_event(SessionContext *s, int64 ts, int customer, const char *type,
		   int product, const char *order_id)
{
	Record	   *rec = s->rec;

	record_reset(rec);
	appendStringInfo(record_next(rec), "ev-%016llx",
					 (unsigned long long) mix3(s->g->seed, STREAM_IDS,
											   ((uint64) s->day << 32) | (s->event_seq++ << 1)));
	append_timestamp(record_next(rec), ts);
	if (customer >= 0)
		appendStringInfo(record_next(rec), "C%07d", customer + 1);
	else
		record_null(rec);
	record_text(rec, s->session_id);
	record_text(rec, type);
	if (product >= 0)
		appendStringInfo(record_next(rec), "P%05d", product + 1);
	else
		record_null(rec);
	if (order_id)
		record_text(rec, order_id);
	else
		record_null(rec);
	record_text(rec, traffic_sources[s->source]);
	record_text(rec, devices[s->device]);
	emit_record(s->out, rec);
}

/*
 * The session that ended in an order: landing pages, the products bought
 * (and a few others) viewed and carted, checkout, purchase.  Some shoppers
 * browse anonymously and log in when they add to cart.
 */
static void
emit_purchase_session(SessionContext *s, Rng *r, const GenOrder *o, int order_seq)
{
	int			npages = 1 + rng_int(r, 3);
	int			nextra = rng_int(r, 3);
	int			extra_products[3];
	int			nevents = npages + o->nlines + nextra + o->nlines + 2;
	int64		start = o->ts - 240 - rng_int(r, 2400);
	bool		anonymous_until_cart = o->customer < 0 || rng_chance(r, 0.3);
	int			k = 0;
	StringInfoData order_id;

	start_session(s, r, o->channel == 1 ? 3
				  : rng_pick_small(r, web_device_weights, lengthof(web_device_weights)));
	for (int i = 0; i < nextra; i++)
		extra_products[i] = pick_product(s->g, r, s->g->products[o->lines[0].product].category);
	initStringInfo(&order_id);
	append_order_id(&order_id, s->g, s->day, order_seq);

#define EVENT_TS(k) (start + (o->ts - start) * (k) / (nevents - 1))
	for (int i = 0; i < npages; i++, k++)
		emit_event(s, EVENT_TS(k), anonymous_until_cart ? -1 : o->customer,
				   "page_view", -1, NULL);
	for (int i = 0; i < o->nlines + nextra; i++, k++)
		emit_event(s, EVENT_TS(k), anonymous_until_cart ? -1 : o->customer, "product_view",
				   i < o->nlines ? o->lines[i].product : extra_products[i - o->nlines], NULL);
	for (int i = 0; i < o->nlines; i++, k++)
		emit_event(s, EVENT_TS(k), o->customer, "add_to_cart", o->lines[i].product, NULL);
	emit_event(s, EVENT_TS(k), o->customer, "checkout", -1, NULL);
	k++;
	emit_event(s, EVENT_TS(k), o->customer, "purchase", -1, order_id.data);
#undef EVENT_TS
	pfree(order_id.data);
}

/* A visit that did not buy: the funnel's drop-off. */
static void
emit_browse_session(SessionContext *s, Rng *r, const double *share_cumulative)
{
	int64		ts = (s->g->start_unix_day + s->day) * SECS_PER_DAY +
	rng_pick_small(r, hour_weights, 24) * 3600 + rng_int(r, 3600);
	int			customer = rng_chance(r, 0.55) ? -1 : pick_customer(s->g, r, s->day);
	int			npages = 1 + rng_int(r, 4);
	int			viewed = -1;

	start_session(s, r, rng_pick_small(r, browse_device_weights, lengthof(browse_device_weights)));
	for (int i = 0; i < npages; i++)
	{
		emit_event(s, ts, customer, "page_view", -1, NULL);
		ts += 15 + rng_int(r, 240);
	}
	if (!rng_chance(r, 0.72))
		return;
	for (int i = 1 + rng_int(r, 3); i > 0; i--)
	{
		int			product = pick_product(s->g, r,
										   rng_pick_cumulative(r, share_cumulative, N_CATEGORIES));

		if (viewed < 0)
			viewed = product;
		emit_event(s, ts, customer, "product_view", product, NULL);
		ts += 15 + rng_int(r, 240);
	}
	if (!rng_chance(r, 0.30))
		return;
	/* some anonymous visitors log in to keep their cart */
	if (customer < 0 && rng_chance(r, 0.15))
		customer = pick_customer(s->g, r, s->day);
	emit_event(s, ts, customer, "add_to_cart", viewed, NULL);
	ts += 15 + rng_int(r, 240);
	if (rng_chance(r, 0.40))
		emit_event(s, ts, customer, "checkout", -1, NULL);
}

static void
emit_events_day(Generator *g, int day, GenOutput *out, Record *rec)
{
	Rng			r;
	int			norders = simulate_orders(g, day);
	int			nbrowse;
	double		share_cumulative[N_CATEGORIES];
	double		acc = 0.0;
	SessionContext s = {out, rec, g, day, 0, 0, "", 0, 0};

	for (int c = 0; c < N_CATEGORIES; c++)
	{
		acc += categories[c].share;
		share_cumulative[c] = acc;
	}
	rng_init(&r, g->seed, STREAM_EVENTS, (uint64) day);
	for (int i = 0; i < norders; i++)
	{
		/* marketplace orders are placed on someone else's site */
		if (g->orders[i].channel != 2)
			emit_purchase_session(&s, &r, &g->orders[i], i);
	}
	nbrowse = rng_poisson(&r, 3.2 * base_orders(g, day));
	for (int i = 0; i < nbrowse; i++)
		emit_browse_session(&s, &r, share_cumulative);
}

static int
table_units(const Generator *g, GenTable t)
{
	return (t == T_CUSTOMERS || t == T_PRODUCTS) ? g->nmonths : g->ndays;
}

static void
emit_unit(Generator *g, GenTable t, int unit, GenOutput *out, Record *rec)
{
	switch (t)
	{
		case T_CUSTOMERS:
			emit_customers_month(g, unit, out, rec);
			break;
		case T_PRODUCTS:
			emit_products_month(g, unit, out, rec);
			break;
		case T_ORDERS:
			emit_orders_day(g, unit, out, rec);
			break;
		case T_EVENTS:
			emit_events_day(g, unit, out, rec);
			break;
		default:
			elog(ERROR, "unexpected sample table %d", (int) t);
	}
}

/* month of a unit, for file naming */
static int
unit_month(const Generator *g, GenTable t, int unit)
{
	return (t == T_CUSTOMERS || t == T_PRODUCTS) ? unit : month_index(g, unit);
}

/* ---------------------------------------------------------------------
 * Table mode: stream a table's records through COPY FROM.
 * ---------------------------------------------------------------------
 */
typedef struct TableStream
{
	Generator  *g;
	GenTable	table;
	int			next_unit;
	GenOutput  *out;
	Record	   *rec;
} TableStream;

static bool
produce_table_chunk(void *arg, StringInfo chunk)
{
	TableStream *ts = arg;

	if (ts->next_unit >= table_units(ts->g, ts->table))
		return false;
	ts->out->buf = chunk;
	emit_unit(ts->g, ts->table, ts->next_unit++, ts->out, ts->rec);
	return ts->next_unit < table_units(ts->g, ts->table);
}

static List *
column_name_list(const char *csv_header)
{
	List	   *names = NIL;
	char	   *copy = pstrdup(csv_header);
	char	   *save = NULL;

	for (char *tok = strtok_r(copy, ",", &save); tok; tok = strtok_r(NULL, ",", &save))
		names = lappend(names, makeString(tok));
	return names;
}

static uint64
load_table(Generator *g, GenTable t, Oid nspid, GenOutput *out, Record *rec)
{
	char	   *relname = psprintf("stg_%s", table_names[t]);
	Oid			relid = get_relname_relid(relname, nspid);
	Oid			seqid = get_relname_relid("load_id_seq", nspid);
	Relation	rel;
	TableStream stream = {g, t, 0, out, rec};
	List	   *columns;
	List	   *options;
	uint64		loaded;
	AclResult	aclresult;

	if (!OidIsValid(relid) || !OidIsValid(seqid))
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_TABLE),
				 errmsg("staging table customer_analytics.%s does not exist", relname),
				 errhint("Reinstall the extension: DROP EXTENSION customer_analytics; CREATE EXTENSION customer_analytics;")));

	aclresult = pg_class_aclcheck(relid, GetUserId(), ACL_INSERT);
	if (aclresult != ACLCHECK_OK)
		aclcheck_error(aclresult, OBJECT_TABLE, relname);

	out->load_id = psprintf(INT64_FORMAT, nextval_internal(seqid, true));
	columns = lappend(column_name_list(table_columns[t]), makeString("load_id"));
	options = list_make2(makeDefElem("format", (Node *) makeString("csv"), -1),
						 makeDefElem("encoding", (Node *) makeString("UTF8"), -1));

	rel = table_open(relid, RowExclusiveLock);
	loaded = ca_copy_from_producer(rel, columns, options, produce_table_chunk, &stream);
	table_close(rel, NoLock);
	return loaded;
}

/* ---------------------------------------------------------------------
 * File mode: one CSV file per table and calendar month.
 * ---------------------------------------------------------------------
 */
/* Close a plain descriptor of ours (out of fd.c's accounting). */
static void
close_fd(int *fd, const char *path)
{
	int			rc;

	if (*fd < 0)
		return;
	rc = close(*fd);
	*fd = -1;
	ReleaseExternalFD();
	if (rc != 0 && path)
		ereport(ERROR,
				(errcode_for_file_access(),
				 errmsg("could not close sample data file \"%s\": %m", path)));
}

/*
 * Refuse what stands where a table's directory (want_dir) or a sample data
 * file should be, when it is a symbolic link (it could point anywhere the
 * server may write) or of the wrong type (a FIFO would block the writer or
 * hand the rows to whoever reads it).  open_errno is the failed open's.
 */
pg_noreturn static void
refuse_output_path(const char *path, bool want_dir, int open_errno)
{
	struct stat st;

	if (lstat(path, &st) == 0 && S_ISLNK(st.st_mode))
	{
		char		target[MAXPGPATH];
		ssize_t		len = readlink(path, target, sizeof(target) - 1);

		target[Max(len, 0)] = '\0';
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errmsg("sample data path \"%s\" is a symbolic link to \"%s\"", path, target),
				 errdetail("generate_sample_data() writes only files of its own and follows no link out of its directory."),
				 errhint("Remove the link, or write to another directory.")));
	}
	if (lstat(path, &st) == 0 && (want_dir ? !S_ISDIR(st.st_mode) : !S_ISREG(st.st_mode)))
		ereport(ERROR,
				(errcode(ERRCODE_WRONG_OBJECT_TYPE),
				 errmsg("sample data path \"%s\" is %s, not a %s", path, ca_file_type_name(st.st_mode),
						want_dir ? "directory" : "regular file"),
				 errhint("Remove it, or write to another directory.")));
	errno = open_errno;
	ereport(ERROR,
			(errcode_for_file_access(),
			 errmsg("could not open sample data %s \"%s\" for writing: %m",
					want_dir ? "directory" : "file", path)));
}

/*
 * Open <directory>/<table>/<name> for writing, following no link below the
 * directory the caller named: each level is opened relative to the one
 * above with O_NOFOLLOW, so a link swapped in between two steps is refused
 * rather than followed.  The file is opened without blocking (a FIFO with
 * no reader fails at once instead of waiting for one) and must be a regular
 * file; only then is it truncated.  The descriptor is a plain one, closed
 * by close_output_file() or, on error, by write_files().
 */
static int
open_sample_file(const char *directory, const char *table, const char *name, const char *path)
{
	char	   *tdir = psprintf("%s/%s", directory, table);
	char	   *mkdir_path = pstrdup(directory);
	struct stat st;
	int			dfd;
	int			tfd;
	int			fd;
	int			save_errno;
	int			flags;

	if (pg_mkdir_p(mkdir_path, pg_dir_create_mode) != 0 && errno != EEXIST)
		ereport(ERROR,
				(errcode_for_file_access(),
				 errmsg("could not create directory \"%s\": %m", directory)));
	dfd = open(directory, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (dfd < 0)
		ereport(ERROR,
				(errcode_for_file_access(),
				 errmsg("could not open directory \"%s\": %m", directory)));
	if (mkdirat(dfd, table, pg_dir_create_mode) != 0 && errno != EEXIST)
	{
		save_errno = errno;
		close(dfd);
		errno = save_errno;
		ereport(ERROR,
				(errcode_for_file_access(),
				 errmsg("could not create directory \"%s\": %m", tdir)));
	}
	tfd = openat(dfd, table, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
	save_errno = errno;
	close(dfd);
	if (tfd < 0)
		refuse_output_path(tdir, true, save_errno);

	fd = openat(tfd, name, O_WRONLY | O_CREAT | O_NOFOLLOW | O_NONBLOCK | O_NOCTTY | O_CLOEXEC,
				pg_file_create_mode);
	save_errno = errno;
	close(tfd);
	if (fd < 0)
		refuse_output_path(path, false, save_errno);
	ReserveExternalFD();
	if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode))
	{
		save_errno = errno;
		close_fd(&fd, NULL);
		refuse_output_path(path, false, save_errno);
	}
	flags = fcntl(fd, F_GETFL);
	if (ftruncate(fd, 0) != 0 || flags < 0 || fcntl(fd, F_SETFL, flags & ~O_NONBLOCK) != 0)
	{
		save_errno = errno;
		close_fd(&fd, NULL);
		errno = save_errno;
		ereport(ERROR,
				(errcode_for_file_access(),
				 errmsg("could not truncate sample data file \"%s\": %m", path)));
	}
	return fd;
}

static void
close_output_file(GenOutput *out, Record *rec)
{
	if (out->fd < 0)
		return;

	/*
	 * A file too short for its defects still gets them, at the end, as copies
	 * of its last record; a file with no record gets none.
	 */
	while (out->npending > 0 && out->file_rows > 0)
		plant_defect(out, rec);
	flush_file_buffer(out);
	close_fd(&out->fd, out->path);
}

static void
open_output_file(GenOutput *out, const Generator *g, const char *directory,
				 GenTable t, int month, bool with_defects)
{
	int			key = g->first_month_key + month;
	char	   *name = psprintf("%s_%04d-%02d.csv", table_names[t], key / 12, key % 12 + 1);
	int			ndefects = 0;
	int			k = 0;
	int			nmonths = (t == T_CUSTOMERS || t == T_PRODUCTS) ? 1 : g->nmonths;

	out->path = psprintf("%s/%s/%s", directory, table_names[t], name);
	out->fd = open_sample_file(directory, table_names[t], name, out->path);
	out->files++;
	out->line = 1;
	out->file_rows = 0;
	out->nplanted = 0;
	appendStringInfo(out->buf, "%s\n", table_columns[t]);

	/*
	 * Defects of a daily table are spread over its months; those of a monthly
	 * table (customers, products) all go in its first file.
	 */
	out->npending = 0;
	if (!with_defects)
		return;
	for (int i = 0; i < lengthof(defect_specs); i++)
		if (defect_specs[i].table == t)
			ndefects++;
	for (int i = 0; i < lengthof(defect_specs); i++)
	{
		if (defect_specs[i].table != t)
			continue;
		if (month == (k * nmonths) / ndefects)
			out->pending[out->npending++] = &defect_specs[i];
		k++;
	}
}

static void
write_files(Generator *g, GenTable t, const char *directory, bool with_defects,
			GenOutput *out, Record *rec)
{
	int			nunits = table_units(g, t);
	int			current_month = -1;

	PG_TRY();
	{
		for (int unit = 0; unit < nunits; unit++)
		{
			int			month = unit_month(g, t, unit);

			if (month != current_month)
			{
				close_output_file(out, rec);
				current_month = month;
				/* monthly units with nothing to say get no file */
				if (t == T_PRODUCTS && month > 0)
				{
					bool		any = false;

					for (int i = 0; i < g->nproducts && !any; i++)
						any = g->products[i].price_change_day >= 0 &&
							month_index(g, g->products[i].price_change_day) == month;
					if (!any)
						continue;
				}
				open_output_file(out, g, directory, t, month, with_defects);
			}
			if (out->fd < 0)
				continue;
			emit_unit(g, t, unit, out, rec);
		}
		close_output_file(out, rec);
	}
	PG_CATCH();
	{
		/* a plain descriptor: no resource owner closes it */
		close_fd(&out->fd, NULL);
		PG_RE_THROW();
	}
	PG_END_TRY();
}

/* ---------------------------------------------------------------------
 * Ground truth tables.
 * ---------------------------------------------------------------------
 */
static void
record_ground_truth(const Generator *g, int32 seed, List *planted)
{
	ListCell   *lc;

	SPI_connect();
	SPI_execute("DELETE FROM customer_analytics.sample_anomaly", false, 0);
	SPI_execute("DELETE FROM customer_analytics.sample_defect", false, 0);
	for (int i = 0; i < g->nanomalies; i++)
	{
		const GenAnomaly *a = &g->anomalies[i];
		Oid			types[5] = {INT4OID, TEXTOID, DATEOID, TEXTOID, FLOAT8OID};
		Datum		values[5];

		values[0] = Int32GetDatum(seed);
		values[1] = CStringGetTextDatum(a->category < 0 ? "total" : categories[a->category].name);
		values[2] = DateADTGetDatum((DateADT) (g->start_unix_day + a->day - UNIX_DAYS_AT_PG_EPOCH));
		values[3] = CStringGetTextDatum(a->factor > 1.0 ? "spike" : "drop");
		values[4] = Float8GetDatum(a->factor);
		SPI_execute_with_args("INSERT INTO customer_analytics.sample_anomaly "
							  "(seed, series, day, kind, factor) VALUES ($1, $2, $3, $4, $5)",
							  5, types, values, NULL, false, 0);
	}
	foreach(lc, planted)
	{
		PlantedDefect *pd = lfirst(lc);
		Oid			types[4] = {TEXTOID, INT8OID, TEXTOID, TEXTOID};
		Datum		values[4];

		values[0] = CStringGetTextDatum(pd->file);
		values[1] = Int64GetDatum(pd->line);
		values[2] = CStringGetTextDatum(psprintf("stg_%s", table_names[pd->spec->table]));
		values[3] = CStringGetTextDatum(pd->spec->kind);
		SPI_execute_with_args("INSERT INTO customer_analytics.sample_defect "
							  "(file, line_number, target, kind) VALUES ($1, $2, $3, $4)",
							  4, types, values, NULL, false, 0);
	}
	SPI_finish();
}

/* ---------------------------------------------------------------------
 * SQL entry point.
 * ---------------------------------------------------------------------
 */
static void
check_range(const char *name, int32 value, int32 min, int32 max)
{
	if (value < min || value > max)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("%s must be between %d and %d, not %d", name, min, max, value)));
}

/*
 * generate_sample_data(customers, days, seed, directory, start_date,
 *						products, events, defects)
 *	  RETURNS TABLE (target text, rows bigint, planted_defects integer, files integer)
 */
Datum
ca_generate_sample_data(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	Generator	g;
	Oid			nspid;
	char	   *directory = NULL;
	bool		with_events;
	bool		with_defects;
	int			last_key;
	Record		rec;
	StringInfoData filebuf;
	List	   *planted = NIL;

	for (int i = 0; i < 8; i++)
		if (i != 3 && PG_ARGISNULL(i))
			ereport(ERROR,
					(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
					 errmsg("only the directory argument of generate_sample_data may be NULL")));

	memset(&g, 0, sizeof(g));
	g.ncustomers = PG_GETARG_INT32(0);
	g.ndays = PG_GETARG_INT32(1);
	g.seed = (uint64) (int64) PG_GETARG_INT32(2);
	g.nproducts = PG_GETARG_INT32(5);
	with_events = PG_GETARG_BOOL(6);
	with_defects = PG_GETARG_BOOL(7);
	check_range("customers", g.ncustomers, 1, 5000000);
	check_range("days", g.ndays, 1, 3660);
	check_range("products", g.nproducts, (int32) N_CATEGORIES, 1000000);
	g.start_unix_day = (int64) PG_GETARG_DATEADT(4) + UNIX_DAYS_AT_PG_EPOCH;
	if (DATE_NOT_FINITE(PG_GETARG_DATEADT(4)))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("start_date must be a finite date")));

	if (!PG_ARGISNULL(3))
	{
		directory = text_to_cstring(PG_GETARG_TEXT_PP(3));
		canonicalize_path(directory);
		if (!is_absolute_path(directory))
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("sample data directory \"%s\" is not an absolute path", directory),
					 errhint("Files are written by the server process; give a full path it can write to.")));
		if (!has_privs_of_role(GetUserId(), ROLE_PG_WRITE_SERVER_FILES))
			ereport(ERROR,
					(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
					 errmsg("permission denied to write sample data files to \"%s\"", directory),
					 errhint("Only superusers and members of pg_write_server_files may write server files; "
							 "call generate_sample_data() without a directory to fill the staging tables instead.")));
	}

	nspid = get_namespace_oid("customer_analytics", false);
	InitMaterializedSRF(fcinfo, 0);

	g.first_month_key = month_key_of_unix_day(g.start_unix_day);
	last_key = month_key_of_unix_day(g.start_unix_day + g.ndays - 1);
	g.nmonths = last_key - g.first_month_key + 1;
	g.orders_capacity = 256;
	g.orders = palloc(sizeof(GenOrder) * g.orders_capacity);
	build_products(&g);
	build_customers(&g);
	build_anomalies(&g);
	record_init(&rec);
	initStringInfo(&filebuf);

	for (int t = 0; t < N_TABLES; t++)
	{
		GenOutput	out;
		Datum		values[4];
		bool		nulls[4] = {false, false, false, false};
		int			ndefects;

		if (t == T_EVENTS && !with_events)
			continue;
		memset(&out, 0, sizeof(out));
		out.fd = -1;
		if (directory)
		{
			out.buf = &filebuf;
			write_files(&g, t, directory, with_defects, &out, &rec);
		}
		else
			load_table(&g, t, nspid, &out, &rec);

		ndefects = list_length(out.planted);
		planted = list_concat(planted, out.planted);
		values[0] = CStringGetTextDatum(psprintf("stg_%s", table_names[t]));
		values[1] = Int64GetDatum(out.rows);
		values[2] = Int32GetDatum(ndefects);
		values[3] = Int32GetDatum(out.files);
		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
	}

	record_ground_truth(&g, PG_GETARG_INT32(2), planted);
	return (Datum) 0;
}
