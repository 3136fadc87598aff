"""A synthetic, templated preference set for fitting r2m's default encoder reward model offline.

`generate_preferences(n, seed)` returns `n` records `{"prompt", "chosen", "rejected", "kind"}`: a chat-style
user request, a good answer to it, and a worse answer whose single flaw is named by `kind` (one of `KINDS`):

- `off_topic`: a fluent, polite, informative answer about another subject (sometimes one relevant sentence
  first, then a drift);
- `ignores_question`: an answer to a different question on the same subject (partly relevant, so subtler),
  sometimes announcing the change of subject;
- `rude`: insulting or condescending, with or without correct content;
- `evasive`: hedges or defers without answering (short or long);
- `needless_refusal`: refuses a harmless request, citing policy or safety;
- `repetitive`: a sentence or phrase looped, or a good start that then repeats itself;
- `too_short`: a one-word or truncated non-answer;
- `wrong_fact`: the same shape as a good answer, with one statement replaced by a plausible false one (for
  arithmetic, percentages and conversions: a wrong number);
- `rambling`: long filler with no information, often parroting the question or flattering the user;
- `gibberish`: word salad (scrambled or random words, keyboard mash);
- `wrong_format`: ignores an explicit format request (one sentence, brief, bullets, numbered steps) or
  answers in a garbled form (shouting, a raw JSON or HTML dump, an unpunctuated run-on).

Prompts come from 54 topics (cooking, Python, git, travel, sleep, first aid, math, history, gardening,
personal finance, writing, pets, emergencies, ...: 160 hand-written subjects plus generated arithmetic,
percentage and unit conversion problems), phrased with a dozen templates per question type, optional
greetings, thanks and format instructions: 2,000 records hold well over 1,500 distinct prompts. Chosen
answers are assembled from 1 to 4 true sentences per subject with varied openings and closings. Length is
deliberately NOT what separates chosen from rejected: many rejected answers are long (repetitive, rambling,
off-topic, padded when a short answer was asked for) and many chosen ones are a single sentence; about half
of the chosen answers are the longer of their pair.

Honest limits. This is a templated, synthetic set written by hand for this repository, not human preference
data. A linear head fitted on it learns generic helpfulness cues (relevance, politeness, informativeness, no
refusal of harmless requests, no degenerate output) only as far as a frozen sentence encoder represents
them; with all-MiniLM-L6-v2 (uncased, mean-pooled) it barely sees wrong facts, same-subject irrelevance,
format requests or repetition, and the head can pick up proxies such as a preference for upbeat wording.
The set knows only the facts of its subjects; it has no multi-turn conversations, code-heavy or long
answers, other languages, subtle reasoning errors, or harmful requests. Because every prompt is benign, a
refusal is always the worse answer here: a head fitted on this set must not be used to judge requests that
should be refused. Held-out accuracy on it measures fit to these templates (held-out prompts share subjects
with training prompts), not reward quality on real traffic. It is a reasonable offline default, not a
substitute for a reward model trained on real preferences.

The generator is deterministic (the same `n` and `seed` give identical records; `n` and `seed` both shape
the sample) and uses only the standard library."""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "KINDS",
    "TOPICS",
    "generate_preferences",
    "read_jsonl",
    "split_preferences",
    "write_jsonl",
]

KINDS: tuple[str, ...] = (
    "off_topic",
    "ignores_question",
    "rude",
    "evasive",
    "repetitive",
    "too_short",
    "wrong_fact",
    "rambling",
    "wrong_format",
    "needless_refusal",
    "gibberish",
)

# ----------------------------------------------------------------------------------------------------------
# Subjects. Format: "@ topic | subject words" starts a topic; "howto:", "concept:" or "why:" starts a subject
# (a verb phrase, a noun phrase, or an embedded question); "+" lines are true statements, in a sensible order;
# "-" lines are plausible but false statements used for `wrong_fact`.
# ----------------------------------------------------------------------------------------------------------
_DATA = r"""
@ cooking | cooking
howto: cook fluffy rice on the stove
+ Rinse the rice in cold water until the water runs mostly clear, which removes excess surface starch.
+ Use roughly one and a half cups of water for every cup of long-grain white rice.
+ Bring it to a boil, then cover the pot and simmer on low heat for about 15 to 18 minutes.
+ Take it off the heat and let it rest, still covered, for five minutes before fluffing it with a fork.
- Keep the lid off and stir the rice constantly while it boils, since stirring is what makes it fluffy.
- Use about five cups of water for every cup of white rice so it never dries out.
howto: make a basic vinaigrette
+ A classic vinaigrette uses about three parts oil to one part vinegar or citrus juice.
+ Whisk in a little Dijon mustard, which helps the oil and vinegar stay emulsified.
+ Season with salt and pepper, and add honey or minced shallot if you like.
+ Taste it on a leaf of lettuce and adjust the acidity or salt before dressing the whole salad.
- A vinaigrette should be equal parts oil and water, with no vinegar or citrus at all.
howto: sear a steak properly
+ Pat the steak dry and salt it generously, ideally 40 minutes or more before cooking.
+ Heat a heavy pan, like cast iron, until it is very hot, then add a thin layer of high smoke point oil.
+ Leave the steak alone for a few minutes so a brown crust can form before you flip it.
+ Use an instant-read thermometer and pull it at about 130°F (54°C) for medium-rare, then let it rest.
- Start the steak in a cold pan and press it down hard so the juices run out; that keeps it moist.
- Medium-rare steak should reach an internal temperature of about 180°F (82°C).
concept: the Maillard reaction
+ The Maillard reaction is a reaction between amino acids and sugars that happens when food is heated.
+ It is responsible for the browning and savory flavors of seared meat, toast, and roasted coffee.
+ It speeds up above roughly 140°C (285°F), which is why dry, hot surfaces brown better than wet ones.
+ It is different from caramelization, which involves sugars alone.
- The Maillard reaction is the process of fat melting, and it happens mostly when food is boiled.

@ baking | baking
howto: bake soft chocolate chip cookies
+ Use more brown sugar than white sugar, because brown sugar holds moisture and keeps cookies chewy.
+ Chill the dough for at least 30 minutes so the cookies spread less and develop more flavor.
+ Bake at around 350°F (175°C) and take them out when the edges are set but the centers look slightly soft.
+ Let them cool on the tray for a few minutes, since they keep cooking from the residual heat.
- Bake the cookies until the centers are completely hard and dark brown, or they will be raw inside.
howto: keep bread dough from being too sticky
+ Some stickiness is normal, especially for wetter doughs, so don't add extra flour too quickly.
+ Knead with lightly wet or oiled hands instead of piling on more flour.
+ Letting the dough rest for 20 minutes lets the flour hydrate, and the dough becomes easier to handle.
+ A bench scraper helps you lift and fold sticky dough without tearing it.
- Sticky dough means the yeast is dead, so you should throw it out and start over.
concept: the difference between baking soda and baking powder
+ Baking soda is pure sodium bicarbonate and needs an acidic ingredient, like buttermilk or yogurt, to react.
+ Baking powder contains baking soda plus a dry acid, so it can make a batter rise on its own.
+ Baking soda is about three to four times stronger, so you can't swap them one for one.
+ Many recipes use both: soda to neutralize acid and help browning, powder for extra lift.
- Baking soda and baking powder are the same chemical, so you can swap them one for one in any recipe.

@ python | Python programming
howto: reverse a list in Python
+ You can reverse a list in place with my_list.reverse(), which returns None.
+ If you want a new reversed list and to keep the original, use slicing: my_list[::-1].
+ The built-in reversed(my_list) gives you an iterator, which is handy in a for loop.
+ For very large lists, reversed() avoids making a full copy.
- In Python, my_list.reverse() returns a new reversed list and leaves the original unchanged.
howto: read a file line by line in Python
+ Open the file in a with statement, like with open('data.txt') as f:, so it is closed automatically.
+ Looping over the file object, for line in f:, reads one line at a time without loading the whole file.
+ Each line keeps its trailing newline, so call line.rstrip('\n') if you don't want it.
+ Pass encoding='utf-8' to open() to avoid surprises on different operating systems.
- You must call f.close() before the for loop, otherwise Python cannot read the lines.
concept: Python virtual environments
+ A virtual environment is an isolated folder with its own Python interpreter and installed packages.
+ It lets each project pin its own dependency versions without conflicting with other projects.
+ You create one with python -m venv .venv and activate it with source .venv/bin/activate on Linux or macOS.
+ While it is active, pip install puts packages inside that environment instead of the system Python.
- A virtual environment is a cloud server that Python uploads your code to when you run it.
howto: handle exceptions in Python
+ Wrap the code that might fail in a try block and catch specific exceptions, such as except ValueError:.
+ Avoid a bare except:, because it hides bugs and even catches things like KeyboardInterrupt.
+ Use an else block for code that should run only if nothing failed, and finally for cleanup.
+ You can wrap an error with raise NewError(...) from err to keep the original traceback.
- A bare except: is the recommended best practice, because it catches everything and never hides bugs.

@ javascript | JavaScript
concept: the difference between let, const, and var in JavaScript
+ let and const are block-scoped, while var is function-scoped.
+ const prevents reassigning the variable, though an object or array it holds can still be modified.
+ var declarations are hoisted and initialized to undefined, which can cause confusing bugs.
+ Modern code usually uses const by default and let when a value needs to be reassigned.
- const in JavaScript makes an object completely immutable, so its properties can never change.
howto: make an HTTP request in JavaScript
+ In modern browsers and Node 18 or later, the built-in fetch() function is the simplest way.
+ fetch returns a Promise, so use await fetch(url) in an async function, then await response.json().
+ Check response.ok, because fetch does not reject on HTTP errors like 404 or 500.
+ Wrap the call in try/catch to handle network failures.
- fetch() throws an exception automatically whenever the server returns a 404 or 500 status.
concept: JavaScript promises
+ A Promise is an object representing a value that may be available now, later, or never.
+ It is either pending, fulfilled with a value, or rejected with an error.
+ You attach handlers with .then() and .catch(), or use async/await so the code reads top to bottom.
+ Promise.all lets you wait for several promises at once.
- A Promise makes JavaScript code run on multiple CPU threads in parallel.

@ git | git and version control
howto: undo the last git commit
+ If you haven't pushed yet, git reset --soft HEAD~1 undoes the commit but keeps your changes staged.
+ git reset --hard HEAD~1 discards the commit and the changes, so only use it if you are sure.
+ If the commit is already pushed and shared, git revert HEAD creates a new commit that undoes it safely.
+ You can usually find lost commits again with git reflog.
- git reset --hard HEAD~1 is the safe option, because it keeps all of your changes in the working tree.
concept: git branches
+ A branch in git is a lightweight, movable pointer to a commit.
+ It lets you work on a feature or fix in isolation without affecting the main line of work.
+ You create and switch to one with git switch -c my-feature, or git checkout -b my-feature.
+ When the work is ready, you merge it back or open a pull request.
- Creating a git branch copies the entire repository into a new folder on disk.
howto: resolve a merge conflict in git
+ Run git status to see which files have conflicts.
+ Open each file and find the <<<<<<<, =======, and >>>>>>> markers around the competing changes.
+ Edit the file so it contains the correct final version, and delete the markers.
+ Then git add the file and run git commit, or git merge --continue, to finish the merge.
- Git resolves every merge conflict automatically, so you never need to edit the files yourself.

@ sql | SQL and databases
concept: SQL joins
+ A JOIN combines rows from two tables based on a related column, such as a customer ID.
+ An INNER JOIN keeps only rows that have a match in both tables.
+ A LEFT JOIN keeps every row from the left table and fills in NULLs where the right table has no match.
+ Joining on indexed columns keeps queries fast on large tables.
- An INNER JOIN returns every row from both tables, even rows that have no match.
howto: speed up a slow SQL query
+ Start by running EXPLAIN or EXPLAIN ANALYZE to see how the database executes the query.
+ Add indexes on columns used in WHERE clauses, JOIN conditions, and ORDER BY.
+ Select only the columns you need instead of SELECT *.
+ Avoid wrapping indexed columns in functions in the WHERE clause, since that can stop the index being used.
- Adding more indexes always makes every query faster, including inserts and updates.
concept: database normalization
+ Normalization is organizing tables to reduce duplicated data and avoid update anomalies.
+ In practice it means each fact is stored in one place, and tables reference each other through keys.
+ The most common levels are first, second, and third normal form.
+ Teams sometimes denormalize on purpose for read performance, accepting some duplication.
- Normalization means copying the same data into as many tables as possible so it is never lost.

@ linux | the Linux command line
howto: find large files on Linux
+ Run du -sh * in a directory to see the size of each item in human-readable form.
+ du -ah /path | sort -rh | head -n 20 lists the twenty largest files and folders.
+ find / -type f -size +1G finds individual files larger than a gigabyte.
+ Tools like ncdu give you an interactive view if you can install them.
- The ls -size command deletes large files automatically to free up space.
concept: file permissions on Linux
+ Every file has read, write, and execute permissions for the owner, the group, and everyone else.
+ ls -l shows them as a string like -rwxr-xr--.
+ chmod changes them; for example, chmod 644 gives the owner read and write and everyone else read-only.
+ chown changes which user and group own the file.
- chmod 777 is the most secure setting, because it blocks everyone except the owner.
howto: see which process is using a port on Linux
+ Run sudo lsof -i :8080, replacing 8080 with your port, to list the process that holds it.
+ sudo ss -ltnp shows all listening TCP sockets along with their process IDs.
+ Once you have the PID, you can inspect it with ps -p PID -o cmd.
+ Stop it gracefully with kill PID before resorting to kill -9.
- Always use kill -9 first, because it lets the process clean up and save its work.

@ travel | travel
howto: plan a budget trip to Europe
+ Travel in the shoulder season, like April to May or September to October, when flights and hotels cost less.
+ Use trains or budget buses between nearby cities, and book long-distance trains early for the best fares.
+ Stay in hostels, guesthouses, or apartments slightly outside the city center.
+ Eat your main meal at lunch, when many restaurants offer cheaper set menus.
- Peak summer in July and August is always the cheapest time to travel around Europe.
howto: deal with jet lag
+ Start shifting your sleep schedule by an hour a day a few days before you leave.
+ Once you arrive, get outside in daylight, which helps reset your body clock.
+ Stay hydrated and go easy on alcohol and caffeine during the flight.
+ If you must nap, keep it under 30 minutes so you can still sleep at night.
- The best cure for jet lag is to sleep all day when you arrive and stay in a dark room until evening.
concept: travel insurance
+ Travel insurance covers unexpected costs like trip cancellation, medical emergencies abroad, or lost bags.
+ Medical coverage matters most, because your health insurance at home may not work in other countries.
+ Read the policy for exclusions, such as pre-existing conditions or adventure sports.
+ Buying it soon after booking usually gives you the longest cancellation coverage.
- Your regular health insurance always covers hospital bills in every country, so travel insurance is useless.

@ flying | air travel and packing
howto: pack light for a week-long trip
+ Pick a simple color palette so every top goes with every bottom.
+ Plan on three or four tops and two bottoms, and do a quick sink wash midweek.
+ Wear your bulkiest shoes and jacket on the plane instead of packing them.
+ Packing cubes or rolling your clothes saves space and keeps things organized.
- Pack a separate full outfit for every day plus spares, since you can never wash clothes while traveling.
concept: the liquids rule for carry-on bags
+ In the US and many other countries, carry-on liquids must be in containers of 100 ml (3.4 oz) or less.
+ All of those containers need to fit in a single clear, resealable quart-sized bag.
+ Medications and baby formula are usually allowed in larger amounts, but declare them at security.
+ Some airports with newer scanners have relaxed the rules, so check the airport's website before you fly.
- Carry-on liquids can be in containers of up to two liters as long as they are sealed.
howto: get through airport security faster
+ Keep your liquids bag and laptop easy to reach so you can take them out quickly if asked.
+ Wear shoes you can slip off and skip belts with large metal buckles.
+ Empty your pockets into your bag before you reach the bins.
+ Trusted-traveler programs like TSA PreCheck give you a faster lane.
- Arriving at the security line five minutes before boarding is the fastest way to get through.

@ sleep | sleep
howto: fall asleep faster
+ Keep a consistent bedtime and wake time, even on weekends.
+ Avoid caffeine after early afternoon, since it can stay in your system for six hours or more.
+ Dim the lights and put screens away about an hour before bed.
+ If you can't sleep after about 20 minutes, get up and do something calm until you feel sleepy.
- Drinking a strong coffee right before bed helps most people fall asleep faster.
why: how much sleep adults need
+ Most adults need about seven to nine hours of sleep a night.
+ Regularly getting less than seven hours is linked to poorer concentration, mood, and health.
+ Teenagers and children need more sleep than adults.
+ Quality matters too: waking often during the night can leave you tired even after enough hours.
- Most adults only need about four hours of sleep a night to stay healthy.
why: why people dream
+ Nobody knows for certain, but the most vivid dreaming happens during REM sleep.
+ Leading theories suggest dreams help us process emotions and consolidate memories.
+ Brain activity during REM sleep looks surprisingly similar to being awake.
+ Most people dream several times a night, even if they don't remember it.
- People only dream once every few weeks, and only during very light sleep.

@ fitness | exercise and fitness
howto: start running as a beginner
+ Begin with run-walk intervals, like one minute running and two minutes walking, for about 20 minutes.
+ Run three times a week with rest days in between so your body can adapt.
+ Go at a conversational pace, where you could still talk in full sentences.
+ Increase your weekly distance gradually, by about 10 percent a week at most, to avoid injury.
- Beginners should run as fast as they can every single day, since rest days slow progress.
concept: the benefits of strength training
+ Strength training builds muscle and bone density, which matters more and more as you age.
+ It improves insulin sensitivity and makes everyday tasks like carrying groceries easier.
+ Two sessions a week covering the major muscle groups is a good starting point.
+ Progressive overload, gradually adding weight or reps, is what drives improvement.
- Strength training weakens your bones, so older adults should avoid it entirely.
howto: stretch safely
+ Warm up first with light movement, such as five minutes of walking.
+ Hold static stretches for about 15 to 30 seconds without bouncing.
+ Stretch to the point of mild tension, never sharp pain.
+ Dynamic stretches like leg swings suit warm-ups, while static stretches fit better after exercise.
- Bouncing hard into a stretch until you feel sharp pain is the fastest way to get flexible.

@ nutrition | nutrition
concept: a balanced diet
+ A balanced diet includes plenty of vegetables and fruit, whole grains, protein, and healthy fats.
+ A simple guide is half your plate vegetables and fruit, a quarter protein, and a quarter whole grains.
+ Limiting added sugar, highly processed foods, and excess salt helps long-term health.
+ Drinking mostly water instead of sugary drinks makes a big difference.
- A balanced diet avoids vegetables and gets most of its calories from sugary drinks.
why: how much protein adults need
+ A common guideline for adults is about 0.8 grams of protein per kilogram of body weight a day.
+ People who do a lot of strength training often benefit from more, around 1.2 to 2 grams per kilogram.
+ Good sources include eggs, fish, chicken, beans, lentils, tofu, and dairy.
+ Spreading protein across your meals helps your body use it well.
- Adults need about 10 grams of protein per kilogram of body weight every day.
why: why fiber is important
+ Fiber helps digestion and keeps bowel movements regular.
+ It slows the absorption of sugar, which helps keep blood sugar more stable.
+ Soluble fiber, found in oats and beans, can help lower LDL cholesterol.
+ Most adults should aim for roughly 25 to 35 grams a day from whole foods.
- Fiber is only found in meat, so vegetarians get almost none.

@ first_aid | first aid
howto: treat a minor burn
+ Cool the burn under cool running water for about 20 minutes, as soon as possible.
+ Remove rings or tight items near the area before it swells.
+ Cover it loosely with a sterile, non-stick dressing or cling film.
+ Don't put ice, butter, or toothpaste on it, and get medical help for large, deep, or facial burns.
- Put ice or butter directly on a burn right away; it is the best way to stop the damage.
howto: help someone who is choking
+ If they can cough forcefully, encourage them to keep coughing.
+ If they can't breathe, cough, or speak, call emergency services and give up to five firm back blows.
+ If that doesn't work, give up to five abdominal thrusts, also called the Heimlich maneuver.
+ Alternate back blows and abdominal thrusts until the object comes out or help arrives.
- If someone is choking, give them a glass of water to wash the object down.
howto: clean a small cut
+ Wash your hands, then rinse the cut under clean running water.
+ Apply gentle pressure with a clean cloth to stop any bleeding.
+ A thin layer of petroleum jelly and a bandage keep it moist and protected.
+ Watch for signs of infection, such as spreading redness, warmth, or pus.
- Small cuts heal best if you leave the dirt in them, since it helps form a scab.
why: what the warning signs of a stroke are
+ The classic signs are summed up as FAST: face drooping, arm weakness, and speech difficulty.
+ The T stands for time: call emergency services immediately if you see any of them.
+ Other signs include sudden confusion, trouble seeing, a severe headache, or loss of balance.
+ Fast treatment matters, because brain cells start dying within minutes without blood flow.
- If you suspect a stroke, wait a few hours to see whether the symptoms go away on their own.

@ wellbeing | mental wellbeing
howto: manage stress at work
+ Break large tasks into smaller steps and focus on one at a time.
+ Take short breaks during the day; even a five-minute walk helps.
+ Set boundaries around work hours and notifications when you can.
+ Talking to a manager, a colleague, or a professional can help if the stress stays high.
- The best way to handle work stress is to skip breaks and work longer hours until it passes.
concept: mindfulness
+ Mindfulness means paying attention to the present moment on purpose, without judging it.
+ A simple practice is to focus on your breathing for a few minutes and gently return when your mind wanders.
+ Research suggests regular practice can reduce stress and improve focus.
+ You don't need any equipment, and even short daily sessions help.
- Mindfulness means keeping your mind completely empty of all thoughts for hours at a time.
howto: calm down during a panic attack
+ Remind yourself that a panic attack is frightening but passes, usually within minutes.
+ Slow your breathing, for example in for four counts and out for six.
+ Ground yourself by naming five things you can see, four you can hear, and three you can touch.
+ If panic attacks keep happening, a doctor or therapist can help; they are very treatable.
- Breathing as fast as you can is the quickest way to end a panic attack.
howto: cope with grief after losing someone
+ Grief is a normal response to loss, and it doesn't follow a fixed timeline.
+ Let yourself feel sad, angry, or numb without judging those feelings.
+ Lean on friends and family, and keep basic routines like eating and sleeping.
+ If the pain stays overwhelming for months, or you think about harming yourself, talk to a doctor or counselor.
- Grief should be over within a week, and talking about the loss only makes it worse.

@ math | math
concept: the Pythagorean theorem
+ The Pythagorean theorem says that in a right triangle, a² + b² = c², where c is the hypotenuse.
+ The hypotenuse is the longest side, opposite the right angle.
+ For example, a right triangle with legs 3 and 4 has a hypotenuse of 5.
+ It is used all the time in geometry, construction, and computing distances.
- The Pythagorean theorem says that a + b = c for the sides of any triangle.
- A right triangle with legs 3 and 4 has a hypotenuse of 7.
howto: add fractions with different denominators
+ First find a common denominator, ideally the least common multiple of the two denominators.
+ Rewrite each fraction with that denominator by multiplying its top and bottom by the same number.
+ Then add the numerators and keep the denominator: 1/3 + 1/4 = 4/12 + 3/12 = 7/12.
+ Simplify the result if the numerator and denominator share a factor.
- To add fractions, just add the tops and the bottoms, so 1/3 + 1/4 = 2/7.
concept: prime numbers
+ A prime number is a whole number greater than 1 whose only divisors are 1 and itself.
+ The first few primes are 2, 3, 5, 7, 11, and 13.
+ 2 is the only even prime.
+ Every whole number greater than 1 can be written as a product of primes in exactly one way.
- 1 is the smallest prime number, and 9 is also prime.

@ statistics | statistics
concept: the difference between the mean and the median
+ The mean is the sum of the values divided by how many there are.
+ The median is the middle value when the data are sorted.
+ The median is less affected by outliers, which is why it is used for things like household income.
+ For example, in 1, 2, 3, 4, 100 the mean is 22 but the median is 3.
- The median is always larger than the mean, because it counts outliers twice.
concept: p-values
+ A p-value is the probability of results at least as extreme as yours if the null hypothesis were true.
+ A small p-value, often below 0.05, suggests the data would be unlikely under the null hypothesis.
+ It is not the probability that the hypothesis is true.
+ A p-value also says nothing about how large or important an effect is.
- A p-value of 0.05 means there is a 95 percent chance that your hypothesis is true.
concept: correlation versus causation
+ Correlation means two variables move together; causation means one actually changes the other.
+ Two things can correlate because a third factor drives both, like ice cream sales and drownings in summer.
+ Randomized experiments are the standard way to establish causation.
+ A strong correlation alone is never proof of cause and effect.
- If two variables are strongly correlated, that proves one of them causes the other.

@ physics | physics
why: why the sky is blue
+ Sunlight contains all colors, and as it passes through the atmosphere it scatters off gas molecules.
+ Shorter wavelengths like blue scatter much more than longer ones like red; this is Rayleigh scattering.
+ That scattered blue light reaches your eyes from every direction, so the whole sky looks blue.
+ At sunset, light crosses more air, so most of the blue is scattered away and reds and oranges remain.
- The sky is blue because it reflects the color of the oceans.
concept: Newton's three laws of motion
+ The first law says an object stays at rest or keeps moving steadily unless a net force acts on it.
+ The second law says force equals mass times acceleration, F = ma.
+ The third law says every action has an equal and opposite reaction.
+ Together they describe everyday motion very well, though relativity is needed near the speed of light.
- Newton's second law says force equals mass divided by velocity.
concept: the difference between speed and velocity
+ Speed is how fast something moves, while velocity is speed in a particular direction.
+ Velocity is a vector, so it has both a magnitude and a direction.
+ A car going around a circular track at a steady 50 km/h has constant speed but changing velocity.
+ Acceleration is any change in velocity, including a change of direction.
- Speed and velocity are exactly the same thing, and direction never matters.

@ chemistry | chemistry
concept: the pH scale
+ The pH scale measures how acidic or basic a solution is, and it runs from 0 to 14.
+ A pH of 7 is neutral, lower values are acidic, and higher values are basic.
+ Each step is a factor of ten, so pH 3 is ten times more acidic than pH 4.
+ Lemon juice is around pH 2, while a baking soda solution is around pH 9.
- On the pH scale, 14 is the most acidic value and 0 is the most basic.
why: why ice floats on water
+ Ice floats because it is less dense than liquid water.
+ When water freezes, hydrogen bonds lock the molecules into an open lattice that takes up more space.
+ Ice is roughly 9 percent less dense than liquid water.
+ This matters for life, because lakes freeze from the top down and the ice insulates the water below.
- Ice floats only because of trapped air bubbles, and perfectly pure ice would sink.
concept: chemical bonds
+ A chemical bond is an attraction that holds atoms together in molecules and compounds.
+ In covalent bonds, atoms share electrons, as in water.
+ In ionic bonds, one atom transfers electrons to another, as in table salt.
+ Metallic bonds involve a sea of shared electrons, which is why metals conduct electricity.
- Table salt is held together by covalent bonds in which sodium and chlorine share protons.

@ biology | biology
concept: photosynthesis
+ Photosynthesis is how plants, algae, and some bacteria turn light energy into chemical energy.
+ They take in carbon dioxide and water and, using sunlight, make glucose and release oxygen.
+ It happens mainly in chloroplasts, which contain the green pigment chlorophyll.
+ Nearly all the oxygen we breathe and most food chains depend on it.
- During photosynthesis, plants absorb oxygen and release carbon dioxide.
why: how vaccines work
+ Vaccines train the immune system by showing it a harmless piece or version of a germ.
+ The body makes antibodies and memory cells without having to survive the actual disease.
+ If you meet the real germ later, your immune system recognizes it and responds quickly.
+ When enough people are vaccinated, it also protects those who can't be, through herd immunity.
- Vaccines work by killing every bacterium in your body for several years.
concept: DNA
+ DNA is the molecule that carries the genetic instructions of almost all living things.
+ It is a double helix built from four bases: adenine, thymine, guanine, and cytosine.
+ A pairs with T and G pairs with C, which lets DNA be copied accurately.
+ Genes are stretches of DNA that code for proteins.
- In DNA, adenine always pairs with guanine, and cytosine pairs with thymine.

@ astronomy | astronomy
why: what causes the seasons
+ Seasons are caused by the tilt of Earth's axis, about 23.5 degrees, not by our distance from the Sun.
+ When your hemisphere tilts toward the Sun, sunlight hits more directly and days are longer, so it's summer.
+ When it tilts away, sunlight is spread out and days are shorter, so it's winter.
+ That is why the Northern and Southern Hemispheres have opposite seasons.
- Seasons happen because Earth is much closer to the Sun in summer and much farther away in winter.
concept: black holes
+ A black hole is a region of space where gravity is so strong that not even light can escape.
+ Many form when a very massive star collapses at the end of its life.
+ The boundary past which nothing returns is called the event horizon.
+ Supermassive black holes sit at the centers of most large galaxies, including our own.
- A black hole is a hole in space that is completely empty and has no mass.
concept: light-years
+ A light-year is a unit of distance, not time.
+ It is how far light travels in one year, about 9.46 trillion kilometers.
+ The nearest star beyond the Sun, Proxima Centauri, is about 4.2 light-years away.
+ When we look at distant objects, we see light that left them long ago.
- A light-year is a unit of time equal to about 365 Earth days.

@ weather | weather and climate
why: how rainbows form
+ A rainbow forms when sunlight enters raindrops, bends, reflects off the back of each drop, and bends again.
+ Each color bends by a slightly different amount, which spreads white light into a spectrum.
+ You see a rainbow when the Sun is behind you and rain is in front of you.
+ The colors always come in the same order, with red on the outside and violet on the inside.
- Rainbows are caused by light reflecting off clouds of dust, and their colors appear in random order.
concept: the difference between weather and climate
+ Weather is the short-term state of the atmosphere: today's temperature, rain, and wind.
+ Climate is the average pattern of weather in a region over decades, usually 30 years or more.
+ A cold day doesn't disprove a warming climate, just as one hot day doesn't prove it.
+ An easy way to remember it: climate is what you expect, weather is what you get.
- Weather and climate are the same thing, and a single cold week proves the climate is cooling.
why: what causes thunder
+ Thunder is the sound of air expanding explosively after lightning heats it.
+ A lightning bolt can heat the air to around 30,000°C in a fraction of a second.
+ You see lightning before you hear thunder because light travels much faster than sound.
+ Counting the seconds between flash and thunder and dividing by three gives a rough distance in kilometers.
- Thunder is the sound of two clouds crashing into each other.

@ ancient_history | ancient and medieval history
concept: the fall of the Western Roman Empire
+ The Western Roman Empire is traditionally said to have fallen in 476 AD, when Odoacer deposed the emperor.
+ Causes included political instability, economic trouble, and pressure from migrating peoples.
+ The empire had been divided into western and eastern halves for administration.
+ The Eastern Roman, or Byzantine, Empire lasted until 1453.
- The Western Roman Empire fell in 1066 AD after the Battle of Hastings.
concept: the Egyptian pyramids
+ The Great Pyramid of Giza was built around 2560 BC for the pharaoh Khufu.
+ The pyramids were monumental tombs for pharaohs and part of larger temple complexes.
+ Evidence suggests they were built by organized, paid crews of workers rather than slaves.
+ The Great Pyramid was the tallest human-made structure in the world for nearly 4,000 years.
- The Great Pyramid of Giza was built around 500 AD by the Romans.
concept: Athenian democracy
+ Athenian democracy developed in the city-state of Athens around the 5th century BC.
+ Citizens voted directly on laws in an assembly rather than electing representatives.
+ Many officials were chosen by lottery to keep power from concentrating.
+ Citizenship was limited to adult free men, so women, slaves, and foreigners were excluded.
- In ancient Athens, every resident, including women and slaves, had full voting rights.
concept: the Black Death
+ The Black Death was a plague pandemic that killed tens of millions of people between 1347 and 1351.
+ It was caused by the bacterium Yersinia pestis, spread by fleas on rats and between people.
+ It may have killed a third or more of Europe's population.
+ The labor shortages that followed raised wages and weakened the feudal system.
- The Black Death was caused by a virus in contaminated drinking water in the 1800s.

@ modern_history | modern history
why: what caused World War I
+ Long-term causes included militarism, rival alliances, imperial competition, and nationalism.
+ The immediate trigger was the assassination of Archduke Franz Ferdinand in Sarajevo in June 1914.
+ Austria-Hungary's ultimatum to Serbia pulled the allies on both sides into war within weeks.
+ The war lasted until the armistice of November 1918.
- World War I was triggered by the attack on Pearl Harbor in 1941.
concept: the Industrial Revolution
+ The Industrial Revolution began in Britain in the late 18th century.
+ It shifted production from hand work to machines, powered first by water and then by steam.
+ Textiles, iron, and later railways were its key industries.
+ It drove rapid urbanization and huge changes in work and living conditions.
- The Industrial Revolution began in the 1950s with the invention of the personal computer.
concept: the Cold War
+ The Cold War was a rivalry between the United States and the Soviet Union from about 1947 to 1991.
+ It was called cold because the two superpowers never fought each other directly.
+ It featured an arms race, a space race, and proxy wars in places like Korea and Vietnam.
+ It ended with the collapse of the Soviet Union in 1991.
- The Cold War was a direct war between the United States and China that ended in 1965.

@ geography | geography
why: which rivers are the longest in the world
+ The Nile and the Amazon are the two longest rivers, each roughly 6,400 to 6,650 kilometers long.
+ Which one is longer depends on how the source is measured, and experts still debate it.
+ The Amazon carries far more water than any other river.
+ The Yangtze in China is the third longest.
- The Thames in England is the longest river in the world.
why: what the seven continents are
+ The seven continents are Africa, Antarctica, Asia, Australia, Europe, North America, and South America.
+ Asia is the largest by both area and population.
+ Antarctica has no permanent residents, only researchers at scientific stations.
+ Some models combine Europe and Asia as Eurasia, which gives six continents.
- Europe is the largest continent by both area and population.
why: why some countries have rainy seasons
+ Tropical rainy seasons are driven largely by a band of rising, moist air near the equator.
+ As that band shifts north and south with the seasons, it brings heavy rain with it.
+ Monsoons happen when land heats up faster than the ocean and draws in moist sea air.
+ South Asia's summer monsoon is the best-known example.
- Rainy seasons happen because the Moon pulls rain clouds toward the equator every few months.

@ gardening | gardening
howto: start a vegetable garden
+ Pick a spot that gets at least six to eight hours of direct sunlight a day.
+ Start small, with a raised bed or a few containers, so it stays manageable.
+ Improve the soil with compost before planting.
+ Easy first crops include lettuce, radishes, bush beans, zucchini, and cherry tomatoes.
- Vegetable gardens grow best in full shade with no direct sunlight at all.
howto: water garden plants correctly
+ Water deeply and less often, so roots grow down instead of staying near the surface.
+ Morning is the best time, since the leaves dry during the day and that reduces disease.
+ Water at the base of the plant rather than on the leaves.
+ Check the soil first: if it's dry about an inch down, it's time to water.
- Give plants a tiny splash on their leaves several times a day, because deep watering harms roots.
concept: composting
+ Composting turns kitchen scraps and yard waste into rich soil through decomposition.
+ A good pile mixes greens, like vegetable scraps, with browns, like dry leaves and cardboard.
+ Keep it about as damp as a wrung-out sponge and turn it every week or two for air.
+ Leave out meat, dairy, and oily foods, which attract pests.
- A compost pile works best when it is sealed airtight and filled mostly with meat and dairy.

@ houseplants | houseplants
howto: keep a houseplant alive
+ Match the plant to your light: pothos tolerates low light, while succulents need bright sun.
+ Overwatering is the most common killer, so let the top of the soil dry out between waterings.
+ Use a pot with drainage holes so excess water can escape.
+ Yellowing lower leaves often mean too much water, while crispy brown edges often mean too little.
- Houseplants need water every day, and pots without drainage holes are best.
howto: repot a plant
+ Repot in spring or early summer, when the plant is actively growing.
+ Choose a new pot only about 2 to 5 centimeters wider than the old one.
+ Gently loosen circling roots and set the plant at the same depth as before.
+ Water it well afterward and keep it out of harsh direct sun for a few days.
- Always move a plant into a pot at least five times bigger, so it never needs repotting again.
why: why houseplant leaves turn yellow
+ The most common cause is overwatering, which suffocates the roots.
+ Underwatering, too little light, or a lack of nutrients like nitrogen can also cause yellowing.
+ It's normal for a few old leaves at the bottom to yellow and drop.
+ Check the soil moisture and drainage first, since that is the usual culprit.
- Yellow leaves always mean the plant needs more water, so water it twice as often.

@ budgeting | personal finance
howto: make a monthly budget
+ Start by writing down your monthly take-home income.
+ Track your spending for a month so you know where the money actually goes.
+ A simple framework is the 50/30/20 rule: 50 percent needs, 30 percent wants, 20 percent savings or debt.
+ Review it each month and adjust, since a budget is a plan, not a punishment.
- The 50/30/20 rule means saving 50 percent of your income and spending the rest however you like.
concept: emergency funds
+ An emergency fund is money set aside for surprises like job loss, medical bills, or car repairs.
+ A common target is three to six months of essential expenses.
+ Keep it somewhere safe and easy to reach, such as a high-yield savings account.
+ Start small: even a few hundred dollars can keep a surprise bill off a credit card.
- An emergency fund should be invested entirely in volatile stocks so it grows as fast as possible.
howto: pay off credit card debt
+ List your debts with their balances and interest rates.
+ The avalanche method pays the highest interest rate first, which saves the most money.
+ The snowball method pays the smallest balance first, which gives quick wins and motivation.
+ Always make at least the minimum payment on every card to avoid fees and credit damage.
- Paying only the minimum each month is the fastest way to clear credit card debt.

@ investing | investing
concept: compound interest
+ Compound interest means you earn interest on your money and on the interest it has already earned.
+ Over time this makes growth accelerate, which is why starting early matters so much.
+ For example, $1,000 at 7 percent a year grows to about $1,967 after 10 years.
+ The same effect works against you on debt, such as credit card balances.
- Compound interest means you earn interest only on your original deposit, never on past interest.
concept: index funds
+ An index fund tracks a market index, like the S&P 500, by holding the same stocks.
+ It gives you instant diversification across many companies.
+ Index funds usually have very low fees because they are passively managed.
+ Over long periods, most actively managed funds fail to beat their index after fees.
- An index fund invests all of your money in a single company chosen by a manager.
concept: diversification
+ Diversification means spreading your money across different investments so one loss doesn't sink you.
+ You can diversify across companies, industries, countries, and asset types like stocks and bonds.
+ It reduces risk without necessarily reducing long-term returns.
+ Broad index funds are an easy way to get it.
- Diversification means putting all of your savings into the one stock you believe in most.

@ credit | credit and banking
concept: credit scores
+ A credit score is a number, often between 300 and 850, that estimates how likely you are to repay debt.
+ Payment history and how much of your credit limit you use are the biggest factors.
+ Paying bills on time and keeping card balances low raises your score over time.
+ Checking your own score is a soft inquiry and does not lower it.
- Checking your own credit score lowers it by about 50 points each time.
concept: the difference between a debit card and a credit card
+ A debit card takes money directly from your bank account.
+ A credit card borrows money from the card issuer, which you repay later.
+ Credit cards usually have stronger fraud protection and can build your credit history.
+ If you don't pay a credit card in full, you are charged interest, often at a high rate.
- A debit card borrows money from the bank, and you repay it later with interest.
howto: avoid bank overdraft fees
+ Turn on low-balance alerts in your banking app.
+ Opt out of overdraft coverage, so declined transactions don't trigger fees.
+ Link a savings account as a backup for overdraft protection transfers.
+ Keep a small buffer in checking so timing mismatches don't push you below zero.
- Overdraft fees are illegal everywhere, so banks can never charge them.

@ essays | essay writing
howto: write a strong thesis statement
+ A thesis states your main argument in one or two sentences, usually at the end of the introduction.
+ Make it specific and arguable, not a simple fact.
+ It should preview the reasons you will use to support it.
+ For example: "Cities should add bike lanes because they cut traffic, improve health, and cut emissions."
- A good thesis should be a fact nobody could disagree with, placed at the very end of the essay.
howto: make writing more concise
+ Cut filler words like "very", "really", and "in order to".
+ Prefer the active voice: "The team fixed the bug" instead of "The bug was fixed by the team".
+ Replace weak verb-noun pairs with strong verbs, like "decide" instead of "make a decision".
+ Read it aloud and delete anything that doesn't add meaning.
- To make writing concise, switch to the passive voice and add qualifiers like "very" and "really".
howto: structure an essay
+ Open with an introduction that gives context and ends with your thesis.
+ Give each body paragraph one main point, with a topic sentence followed by evidence.
+ Use transitions to connect paragraphs so the argument flows.
+ End with a conclusion that ties the points together without simply repeating them.
- An essay should start with its conclusion and leave out the thesis entirely.

@ workplace_writing | workplace communication
howto: write a professional email
+ Use a clear subject line that says what the email is about.
+ Put the main point or request in the first two sentences.
+ Keep it short, polite, and focused on one topic.
+ End with a clear next step and a simple sign-off like "Best regards".
- A professional email should bury the main request at the end, after several long paragraphs of background.
howto: ask for a raise
+ Schedule a dedicated meeting rather than bringing it up in passing.
+ Prepare a list of your accomplishments and their impact, with numbers if possible.
+ Research typical pay for your role and location so you can name a specific figure.
+ Stay calm and professional, and if the answer is no, ask what it would take to get there.
- Threatening to quit on the spot is the most reliable way to get a raise.
howto: decline a meeting invitation politely
+ Reply promptly so the organizer can plan.
+ Thank them for the invitation and give a brief reason without over-explaining.
+ Offer an alternative, like another time or asking for the notes afterward.
+ Something like "Thanks for including me; I have a conflict then, but could you share the notes?" works well.
- The polite way to decline a meeting is to ignore the invitation and simply not show up.

@ grammar | grammar
concept: the difference between its and it's
+ "It's" is a contraction of "it is" or "it has".
+ "Its" is the possessive form, as in "the dog wagged its tail".
+ A quick test: if you can replace the word with "it is", write "it's".
+ Possessive pronouns like its, his, and hers never take an apostrophe.
- "Its" without an apostrophe means "it is", and "it's" with an apostrophe is the possessive.
concept: semicolons
+ A semicolon joins two closely related clauses that could each stand alone as a sentence.
+ For example: "I have a big test tomorrow; I can't go out tonight."
+ It can also separate items in a list when the items already contain commas.
+ Don't use one before a fragment or where a colon should introduce a list.
- A semicolon should go before every list, the same way a colon does.
concept: the difference between affect and effect
+ "Affect" is usually a verb meaning to influence, as in "the weather affects my mood".
+ "Effect" is usually a noun meaning a result, as in "the medicine had a strong effect".
+ A memory trick: affect is the action, effect is the end result.
+ There are rare exceptions, such as "to effect change", meaning to bring change about.
- "Effect" is the verb and "affect" is the noun, so you would write "the weather effects my mood".

@ languages | language learning
howto: learn a new language faster
+ Practice a little every day instead of cramming once a week.
+ Use spaced repetition flashcards for vocabulary.
+ Listen to podcasts, shows, or music in the language to train your ear.
+ Start speaking early, mistakes and all, with a tutor or a language exchange partner.
- The fastest way to learn a language is to memorize grammar tables and never speak until you are fluent.
concept: spaced repetition
+ Spaced repetition is a study method where you review material at increasing intervals.
+ You see a card again just before you are likely to forget it, which strengthens memory efficiently.
+ Apps like Anki schedule the reviews for you.
+ It works especially well for vocabulary, facts, and formulas.
- Spaced repetition means reviewing every card the same number of times in one long session.
howto: improve pronunciation in a foreign language
+ Listen closely to native speakers and copy their rhythm and intonation, not just individual sounds.
+ Try shadowing: play a short clip and repeat it out loud right after the speaker.
+ Record yourself and compare it with the original.
+ Focus on sounds that don't exist in your native language, since those cause the most trouble.
- Pronunciation cannot improve after childhood, so practice makes no difference.

@ career | careers and job hunting
howto: prepare for a job interview
+ Research the company, its products, and the role so you can explain why you want the job.
+ Prepare examples using the STAR method: situation, task, action, and result.
+ Practice answering common questions out loud.
+ Have a few thoughtful questions ready to ask the interviewer at the end.
- It's best not to research the company, so your answers sound more spontaneous.
howto: write a good resume
+ Keep it to one page if you have less than about ten years of experience.
+ Start each bullet with a strong action verb and show results, with numbers where possible.
+ Tailor it to each job by echoing the key skills in the job description.
+ Use a clean, simple layout and proofread carefully for typos.
- A resume should list every job duty in long paragraphs and never mention results.
howto: negotiate a job offer
+ Express enthusiasm for the role before discussing numbers.
+ Research market pay so you can back up your request with data.
+ Ask for a specific number, and consider the whole package, including bonus, equity, and vacation.
+ Get the final offer in writing.
- Always accept the first offer immediately, because negotiating usually gets offers withdrawn.

@ productivity | productivity
howto: stop procrastinating
+ Break the task into a first step so small it feels easy, like opening the document.
+ Try the Pomodoro technique: 25 minutes of focused work, then a 5-minute break.
+ Remove distractions; for example, put your phone in another room.
+ Be kind to yourself, because guilt tends to make procrastination worse.
- The Pomodoro technique means working for four hours straight without any breaks.
concept: the Eisenhower matrix
+ The Eisenhower matrix sorts tasks by two questions: is it urgent, and is it important?
+ Tasks that are urgent and important you do now; important but not urgent ones you schedule.
+ Urgent but unimportant tasks you delegate if you can, and tasks that are neither you drop.
+ It helps you spend time on important work before it turns into a crisis.
- The Eisenhower matrix says you should always do the least important tasks first.
howto: focus while working from home
+ Set up a dedicated workspace, even a small corner, that you only use for work.
+ Keep regular hours and start the day with a short routine, like getting dressed and making coffee.
+ Block time on your calendar for deep work and turn off notifications during it.
+ Take real breaks away from the screen, ideally outside.
- Working from bed with the TV on is the best way to stay focused at home.

@ diy | home repair
howto: fix a leaky faucet
+ Turn off the water supply under the sink first.
+ Most drips come from a worn washer, O-ring, or cartridge.
+ Take the handle apart, note the order of the parts, and take the old part to a hardware store to match it.
+ Reassemble everything, turn the water back on slowly, and check for leaks.
- Start fixing a faucet with the water supply still on, so you can see where the leak is.
howto: patch a small hole in drywall
+ Fill small nail holes with spackle using a putty knife.
+ For holes up to a few centimeters, use a self-adhesive mesh patch covered with joint compound.
+ Let it dry, sand it smooth, and apply a second thin coat if needed.
+ Prime the spot before painting so it doesn't show through.
- Fill drywall holes with toothpaste; it dries harder than spackle and never needs sanding.
howto: unclog a drain without chemicals
+ Start with a plunger, making sure there is enough water to cover the cup.
+ Pour a kettle of hot water down kitchen drains to loosen grease.
+ A cheap plastic drain snake pulls hair out of bathroom drains very effectively.
+ Cleaning out the P-trap under the sink often clears stubborn clogs.
- Pouring cooking grease down the drain is a good way to lubricate and clear a clog.

@ cleaning | cleaning
howto: remove a red wine stain
+ Act quickly and blot, don't rub, to soak up as much wine as possible.
+ Rinse the area with cold water from the back of the fabric.
+ Apply a mix of dish soap and hydrogen peroxide or a stain remover, then wash as usual.
+ Avoid hot water and the dryer until the stain is gone, since heat can set it.
- Rub a red wine stain hard with hot water and put it in the dryer right away.
howto: clean an oven
+ Make a paste of baking soda and water and spread it inside, avoiding the heating elements.
+ Leave it overnight so it can loosen baked-on grease.
+ Wipe it off with a damp cloth, then spray a little vinegar to dissolve any remaining residue.
+ In future, put a sheet pan on the lower rack to catch drips.
- A baking soda paste only works if you wipe it off within ten seconds of applying it.
concept: the difference between cleaning and disinfecting
+ Cleaning removes dirt and many germs from surfaces with soap or detergent and water.
+ Disinfecting uses chemicals to kill the germs that remain.
+ It's best to clean first, because dirt can stop disinfectants from working.
+ Never mix bleach with ammonia or vinegar, since that creates toxic gases.
- Disinfectants work best on dirty surfaces, so there's no need to clean first.

@ cars | car maintenance
howto: check a car's tire pressure
+ Find the recommended pressure on the sticker inside the driver's door, not the number on the tire itself.
+ Check when the tires are cold, before driving or after the car has sat for a few hours.
+ Press a tire gauge firmly onto the valve stem to get a reading.
+ Add air until it matches the recommendation, and check it monthly.
- Always inflate your tires to the maximum pressure printed on the sidewall for the best grip.
why: how often a car's oil should be changed
+ Many modern cars using synthetic oil can go 5,000 to 10,000 miles between oil changes.
+ Your owner's manual gives the interval your manufacturer recommends.
+ Severe conditions, like frequent short trips or towing, call for more frequent changes.
+ Check the level with the dipstick every month or so between changes.
- Engine oil should be changed every 100 miles, no matter what car you have.
howto: jump-start a car
+ Connect a red clamp to the dead battery's positive terminal and the other red clamp to the good battery's.
+ Connect a black clamp to the good battery's negative terminal and the last to bare metal on the dead car.
+ Start the working car, let it run a few minutes, then try starting the dead one.
+ Remove the cables in reverse order once it starts.
- Connect the red clamp to the positive terminal on one car and the negative terminal on the other.

@ emergencies | emergency preparedness
howto: prepare a home emergency kit
+ Store at least three days of water, about four liters per person per day, plus non-perishable food.
+ Include a flashlight, spare batteries, a first aid kit, and any essential medications.
+ Keep copies of important documents and some cash in a waterproof bag.
+ Check the kit every six months and replace expired food and batteries.
- An emergency kit only needs snacks, since power and water are never cut off for more than an hour.
why: what to do if a fire breaks out at home
+ Get out fast and stay out, because a house fire can become deadly within a few minutes.
+ Crawl low under smoke, where the air is cleaner, and feel doors for heat before opening them.
+ Call emergency services once you are outside, and never go back in for belongings.
+ Working smoke alarms on every level and a practiced escape plan save lives.
- If a fire starts, stay inside and gather your valuables first, since firefighters arrive quickly.
howto: stay safe during an earthquake
+ Drop, cover, and hold on: get down, take cover under sturdy furniture, and hold on until the shaking stops.
+ Stay away from windows and anything that could fall on you.
+ If you are outside, move away from buildings, trees, and power lines.
+ Afterward, expect aftershocks, and check for injuries and gas leaks.
- During an earthquake, run outside immediately, even if you have to pass under falling debris.

@ dogs | dogs
howto: house-train a puppy
+ Take the puppy outside first thing in the morning, after meals, after naps, and before bed.
+ Go to the same spot each time, and praise or give a treat right after they go.
+ Supervise closely indoors and use a crate for short periods, since dogs avoid soiling their den.
+ Clean accidents with an enzymatic cleaner, and don't punish the puppy.
- Rubbing a puppy's nose in its accidents is the fastest way to house-train it.
howto: teach a dog to sit
+ Hold a treat near the dog's nose and slowly move it up and back over its head.
+ As the head follows the treat, the rear naturally lowers into a sit.
+ The moment they sit, say "sit", praise them, and give the treat.
+ Repeat in short sessions of a few minutes, then gradually phase out the treat lure.
- Push down hard on the dog's back until it sits, because treats only confuse dogs.
why: which foods are toxic to dogs
+ Chocolate is toxic to dogs, especially dark chocolate and baking chocolate.
+ Grapes and raisins can cause kidney failure, even in small amounts.
+ Onions, garlic, and the sweetener xylitol are also dangerous.
+ If your dog eats something toxic, call your vet or a pet poison hotline right away.
- Chocolate and grapes are healthy treats for dogs in any amount.

@ cats | cats
why: why cats knead
+ Kneading is an instinct from kittenhood, when kittens knead to stimulate milk flow.
+ Adult cats often knead when they feel content and relaxed.
+ They have scent glands in their paws, so kneading also marks territory.
+ Trimming their claws or putting a blanket on your lap makes it more comfortable for you.
- Cats knead because they are in pain and need emergency veterinary care.
howto: introduce a new cat to a resident cat
+ Keep the new cat in a separate room with its own food, water, and litter box at first.
+ Swap bedding between the cats so they get used to each other's scent.
+ Then let them see each other through a baby gate, and feed them on either side of it.
+ Go slowly over days or weeks, and separate them if there is hissing or fighting.
- Put the new cat and the resident cat together in one small room right away so they can sort it out.
howto: stop a cat from scratching furniture
+ Give the cat sturdy scratching posts, both vertical and horizontal, near the furniture it targets.
+ Reward the cat with treats or play when it uses the post.
+ Make the furniture less appealing with double-sided tape or a throw.
+ Keep its claws trimmed to limit the damage.
- Yelling at a cat every time it scratches is what teaches it to love scratching posts.

@ parenting | parenting
howto: get a toddler to eat vegetables
+ Keep offering vegetables without pressure, since kids often need many tries before accepting a new food.
+ Eat them yourself, because children copy what they see.
+ Involve them in washing vegetables or choosing them at the store.
+ Serve small portions alongside foods they already like.
- Forcing toddlers to finish every vegetable before leaving the table makes them love vegetables.
howto: handle toddler tantrums
+ Stay calm yourself, since your reaction shapes theirs.
+ Name the feeling, like "You're upset because we have to leave the park".
+ Keep them safe, but don't give in to the demand that set off the tantrum.
+ Head off tantrums with predictable routines, and by making sure they aren't too tired or hungry.
- Giving a toddler whatever they want during a tantrum is the best way to stop tantrums for good.
concept: screen time guidelines for young children
+ Pediatric groups advise avoiding screens, other than video chats, for children under 18 to 24 months.
+ For ages 2 to 5, about one hour a day of high-quality programming is a common guideline.
+ Watching together and talking about what you see helps children learn more.
+ Keep screens out of bedrooms and away from meals and the hour before bed.
- Pediatric groups recommend at least six hours of screen time a day for toddlers.

@ music | music
howto: learn to play guitar as an adult
+ Start with a handful of open chords, such as G, C, D, E minor, and A minor.
+ Practice 15 to 30 minutes a day; short regular sessions beat long occasional ones.
+ Tune the guitar every time you play so your ear learns the right pitches.
+ Learn simple songs you love early on to stay motivated.
- Adults can't learn guitar, because finger coordination only develops in childhood.
concept: major scales
+ A major scale is a sequence of seven notes with a fixed pattern of whole and half steps.
+ The pattern is whole, whole, half, whole, whole, whole, half.
+ C major uses only the white keys on a piano: C, D, E, F, G, A, B.
+ Most Western melodies and chords are built from major and minor scales.
- The C major scale uses only the black keys on a piano.
howto: read sheet music
+ Start with the staff: five lines, with notes sitting on the lines or in the spaces.
+ In treble clef, the lines from bottom to top are E, G, B, D, F: "Every Good Boy Does Fine".
+ The shape of a note shows its length, such as whole, half, quarter, and eighth notes.
+ The time signature tells you how many beats are in each measure.
- In treble clef, the lines from bottom to top are A, C, E, G, B.

@ photography | photography
concept: the exposure triangle
+ The exposure triangle is aperture, shutter speed, and ISO, the three settings that control brightness.
+ Aperture also controls depth of field: a wide aperture like f/1.8 blurs the background.
+ Shutter speed controls motion blur, and fast speeds freeze action.
+ A higher ISO brightens the image but adds noise.
- A wide aperture like f/1.8 makes everything from foreground to background perfectly sharp.
howto: take better photos with a phone
+ Clean the lens, because smudges are a common cause of hazy photos.
+ Use natural light, and try shooting in the hour after sunrise or before sunset.
+ Tap to focus on your subject, then slide to adjust the exposure.
+ Turn on the grid to use the rule of thirds and keep the horizon level.
- Always use the digital zoom at maximum, because it makes phone photos sharper.
concept: the rule of thirds
+ The rule of thirds divides the frame into a three-by-three grid.
+ Placing the subject along those lines or where they cross often makes a more balanced photo.
+ Horizons usually look better on the upper or lower line than dead center.
+ It's a guideline, not a law, and symmetrical scenes often look great centered.
- The rule of thirds says the subject must always be placed exactly in the center of the frame.

@ computers | computers and tech support
howto: speed up a slow computer
+ Restart it, since a fresh boot clears memory and finishes pending updates.
+ Check which programs use the most CPU and memory in Task Manager or Activity Monitor.
+ Disable unnecessary startup programs and uninstall software you don't use.
+ If it still has a hard disk drive, upgrading to an SSD is often the biggest improvement.
- Filling your disk completely with files makes a computer run faster.
howto: back up important files
+ Follow the 3-2-1 rule: three copies of your data, on two kinds of storage, with one off-site.
+ Use automatic tools, like Time Machine on a Mac or File History on Windows, with an external drive.
+ Add a cloud backup service for the off-site copy.
+ Test restoring a file now and then to make sure the backup actually works.
- Keeping a single copy on the same laptop is a complete backup strategy.
concept: the difference between RAM and storage
+ RAM is fast, temporary memory that holds what the computer is working on right now.
+ Storage, like an SSD or hard drive, keeps files and programs even when the power is off.
+ More RAM lets you run more programs at once smoothly.
+ More storage lets you keep more files, but doesn't directly make the computer faster.
- RAM keeps your files permanently, even when the computer is turned off.

@ security | online security
howto: create a strong password
+ Length matters most, so aim for at least 12 to 16 characters.
+ A passphrase of several random words is strong and easier to remember.
+ Use a different password for every account so one breach doesn't expose the others.
+ A password manager can generate and store unique passwords for you.
- Using the same short password on every account is safest, because you won't forget it.
concept: two-factor authentication
+ Two-factor authentication adds a second check beyond your password, like an app code or a security key.
+ Even if someone steals your password, they can't log in without the second factor.
+ Authenticator apps and hardware keys are safer than codes sent by SMS.
+ Turn it on first for your email, banking, and password manager accounts.
- Two-factor authentication replaces your password with an SMS code, which is the most secure method.
howto: recognize a phishing email
+ Be suspicious of urgent messages asking you to act immediately or verify your account.
+ Check the sender's actual email address, not just the display name.
+ Hover over links to see where they really go before clicking.
+ When in doubt, contact the company through its official website instead of replying.
- An email is safe whenever it shows a company's logo, so you can click any link in it.
why: what to do after a data breach
+ Change the password of the breached account right away, and anywhere else you reused it.
+ Turn on two-factor authentication for that account.
+ Watch your bank and card statements closely for fraud.
+ Consider freezing your credit if sensitive data, like an ID number, was leaked.
- After a data breach, keep your old password, because changing it alerts the attackers.

@ environment | the environment
concept: the greenhouse effect
+ The greenhouse effect is warming caused by atmospheric gases trapping heat radiated from Earth's surface.
+ Carbon dioxide, methane, and water vapor are major greenhouse gases.
+ Without it, Earth would be far too cold for most life.
+ Burning fossil fuels adds extra carbon dioxide, which strengthens the effect and warms the climate.
- The greenhouse effect is caused by the hole in the ozone layer letting in more sunlight.
howto: recycle correctly
+ Check your local rules, because accepted materials vary from city to city.
+ Rinse food residue out of containers before recycling them.
+ Keep plastic bags out of curbside bins, since they jam sorting machines; many stores take them back.
+ When in doubt, leave it out, because contamination can spoil a whole batch.
- Put everything in the recycling bin, even greasy food and plastic bags, because machines sort it all.
howto: reduce a household's carbon footprint
+ Cut energy use at home with insulation, LED bulbs, and a smart thermostat.
+ Drive less, walk or cycle for short trips, and fly less where you can.
+ Eat more plant-based meals, since beef has a particularly high footprint.
+ Switch to a renewable electricity plan if one is available.
- Beef has one of the lowest carbon footprints of any food.

@ literature | literature
concept: the themes of Shakespeare's Macbeth
+ Macbeth explores ambition and what happens when it is not checked by morality.
+ Guilt is another central theme, shown in Lady Macbeth's sleepwalking and Macbeth's visions.
+ The witches raise questions about fate versus free will.
+ The play also shows how violence breeds more violence and paranoia.
- Macbeth is a lighthearted comedy about two young lovers who get married at the end.
howto: analyze a poem
+ Read it several times, at least once out loud, to hear its rhythm.
+ Identify the speaker, the situation, and the tone.
+ Look at imagery, figurative language, and word choice, and ask what effect they create.
+ Consider the structure, like line breaks, stanzas, and rhyme, and how it supports the meaning.
- To analyze a poem, count its words, because a poem's meaning depends only on its length.
concept: the difference between a metaphor and a simile
+ Both compare two different things to highlight something they share.
+ A simile uses "like" or "as", as in "brave as a lion".
+ A metaphor makes the comparison directly, as in "time is a thief".
+ Metaphors often feel more forceful, since they don't signal the comparison.
- A metaphor always uses the word "like", while a simile never does.
concept: the plot of Hamlet
+ Prince Hamlet's father is murdered by his uncle Claudius, who then marries Hamlet's mother and takes the throne.
+ The ghost of Hamlet's father appears and asks him to avenge the murder.
+ Hamlet's hesitation and feigned madness lead to the deaths of Polonius and Ophelia.
+ The play ends in a poisoned duel in which Hamlet, Claudius, Gertrude, and Laertes all die.
- Hamlet ends happily, with Hamlet crowned king and married to Ophelia.

@ art | drawing and art
howto: start learning to draw
+ Begin with basic shapes like circles, boxes, and cylinders, since most objects can be built from them.
+ Draw from real life as often as you can, not only from photos.
+ Keep a sketchbook and draw a little every day.
+ Study light and shadow by drawing simple objects under a single lamp.
- You should only ever draw from memory, because drawing from life or photos is cheating.
concept: color theory basics
+ In traditional color theory, the primary colors are red, yellow, and blue.
+ Complementary colors, like blue and orange, sit opposite each other on the color wheel and contrast sharply.
+ Analogous colors sit next to each other and look harmonious.
+ Warm colors tend to advance, while cool colors tend to recede.
- Complementary colors sit right next to each other on the color wheel, like blue and green.
concept: perspective drawing
+ Perspective drawing creates the illusion of depth on a flat surface.
+ In one-point perspective, lines going away from you meet at a single vanishing point on the horizon.
+ Two-point perspective uses two vanishing points, which is useful for buildings seen from a corner.
+ Objects get smaller as they get closer to the vanishing point.
- In perspective drawing, objects get larger the farther away they are.

@ machine_learning | machine learning
concept: overfitting
+ Overfitting is when a model learns its training data too closely, noise included, and fails on new data.
+ A telltale sign is high training accuracy with much lower validation accuracy.
+ Remedies include more data, regularization, simpler models, and early stopping.
+ Always evaluate on data the model hasn't seen during training.
- Overfitting means the model does better on new data than on its training data.
concept: gradient descent
+ Gradient descent is an optimization method that adjusts a model's parameters to reduce a loss function.
+ At each step it moves the parameters a little in the direction opposite to the gradient.
+ The learning rate sets the step size: too large can diverge, and too small is slow.
+ Stochastic gradient descent uses small batches of data to make each step cheaper.
- Gradient descent moves the parameters in the same direction as the gradient to increase the loss.
concept: the difference between supervised and unsupervised learning
+ Supervised learning trains on labeled examples, where each input comes with the right answer.
+ Classification and regression are typical supervised tasks.
+ Unsupervised learning finds structure in unlabeled data, like clusters or patterns.
+ Grouping customers by their behavior is a common unsupervised example.
- Supervised learning uses no labels at all, while unsupervised learning needs every example labeled.

@ economics | economics
concept: inflation
+ Inflation is the general rise in prices over time, which reduces what money can buy.
+ It is usually measured with a consumer price index that tracks a basket of goods.
+ Many central banks aim for inflation of about 2 percent a year.
+ Central banks often raise interest rates to cool inflation when it runs too high.
- Central banks usually cut interest rates to fight high inflation, since cheaper loans lower prices.
concept: supply and demand
+ Supply and demand describes how prices are set in a market.
+ When demand rises and supply stays the same, prices tend to go up.
+ When supply rises and demand stays the same, prices tend to fall.
+ The price where the quantity supplied equals the quantity demanded is called the equilibrium.
- When demand rises and supply stays the same, prices always fall.
concept: GDP
+ GDP, or gross domestic product, is the total value of goods and services a country produces in a period.
+ It is one of the main measures of the size and growth of an economy.
+ Real GDP adjusts for inflation, so it shows actual growth in output.
+ GDP per person is often used to compare living standards, though it ignores inequality and unpaid work.
- GDP measures the total amount of money stored in a country's banks.
"""

_CALC_TOPICS: tuple[tuple[str, str], ...] = (
    ("arithmetic", "arithmetic"),
    ("percentages", "percentages"),
    ("conversions", "unit conversions"),
)


@dataclass(frozen=True)
class _Item:
    topic: str
    subject: str  # a few words naming the topic, for filler and hedges
    qtype: str  # howto | concept | why | calc
    phrase: str  # what the templates put in their slot; for calc, a short description
    facts: tuple[str, ...]  # true statements; for calc, facts[0] is the answer and the rest explain it
    wrong: tuple[str, ...]  # false statements (for calc: the same answer sentence with a wrong number)
    prompts: tuple[str, ...] = ()  # calc only: the ways to ask


def _parse(text: str) -> tuple[tuple[str, str, tuple[_Item, ...]], ...]:
    topics: list[tuple[str, str, list[_Item]]] = []
    current: dict | None = None

    def flush() -> None:
        if current is not None:
            topics[-1][2].append(
                _Item(
                    topics[-1][0],
                    topics[-1][1],
                    current["qtype"],
                    current["phrase"],
                    tuple(current["facts"]),
                    tuple(current["wrong"]),
                )
            )

    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("@"):
            flush()
            current = None
            name, subject = (s.strip() for s in line[1:].split("|"))
            topics.append((name, subject, []))
        elif line.startswith(("howto:", "concept:", "why:")):
            flush()
            qtype, phrase = line.split(":", 1)
            current = {"qtype": qtype, "phrase": phrase.strip(), "facts": [], "wrong": []}
        elif line.startswith("+ ") and current is not None:
            current["facts"].append(line[2:])
        elif line.startswith("- ") and current is not None:
            current["wrong"].append(line[2:])
        else:  # pragma: no cover - a typo in _DATA
            raise ValueError(f"prefdata: cannot parse line {raw!r}")
    flush()
    return tuple((name, subject, tuple(items)) for name, subject, items in topics)


_SUBJECTS = _parse(_DATA)
TOPICS: tuple[str, ...] = tuple(t[0] for t in _SUBJECTS) + tuple(t[0] for t in _CALC_TOPICS)
_CALC_SUBJECT = dict(_CALC_TOPICS)
_SUBJECT_ITEMS: tuple[_Item, ...] = tuple(item for _, _, items in _SUBJECTS for item in items)

# ----------------------------------------------------------------------------------------------------------
# Prompt templates
# ----------------------------------------------------------------------------------------------------------
_TEMPLATES: dict[str, tuple[str, ...]] = {
    "howto": (
        "How do I {p}?",
        "How can I {p}?",
        "What's the best way to {p}?",
        "Can you give me some tips on how to {p}?",
        "I'm a complete beginner. How should I {p}?",
        "Explain how to {p}, please.",
        "Any advice on how to {p}?",
        "What steps should I follow to {p}?",
        "Quick question: how do you {p}?",
        "I want to {p}. Where do I start?",
        "how do i {p}",
        "Could you walk me through how to {p}?",
        "Is there an easy way to {p}?",
    ),
    "concept": (
        "Can you explain {p}?",
        "Could you explain {p} in simple terms?",
        "Tell me about {p}.",
        "Help me understand {p}.",
        "What should I know about {p}?",
        "explain {p} like I'm five",
        "Give me a short overview of {p}.",
        "I keep hearing about {p}. Can you explain?",
        "Write a short explanation of {p}.",
        "I'm studying {p} for a class. What are the key points?",
        "Can you break down {p} for me?",
        "I never really understood {p}. Could you help?",
        "Please summarize {p}.",
    ),
    "why": (
        "Can you tell me {p}?",
        "I've always wondered {p}. Can you explain?",
        "Do you know {p}?",
        "Please explain {p}.",
        "My kid asked me {p}, and I didn't know what to say. Can you help?",
        "I'm curious about {p}.",
        "Could you explain {p}?",
        "Help me understand {p}.",
        "I'd like to know {p}.",
        "can someone explain {p}",
        "I was just thinking about {p}. What's the answer?",
    ),
}
_PROMPT_PREFIXES = (
    "Hi!",
    "Hello.",
    "Hey there.",
    "Sorry if this is a basic question.",
    "I've been wondering about this for a while.",
    "I need some help.",
    "Hoping you can help.",
)
_PROMPT_SUFFIXES = ("Thanks!", "Thank you.", "Thanks in advance.", "I'd appreciate any help.")
_FORMAT_INSTRUCTIONS: dict[str, tuple[str, ...]] = {
    "one_sentence": (
        "Please answer in one sentence.",
        "Answer in a single sentence.",
        "One sentence only, please.",
    ),
    "brief": ("Keep it short.", "Please be brief.", "Just the short version, please."),
    "bullets": (
        "Please use bullet points.",
        "Give me the answer as a bulleted list.",
        "Format it as a list.",
    ),
    "steps": ("List the steps.", "Give me numbered steps.", "Answer with numbered steps, please."),
}

# ----------------------------------------------------------------------------------------------------------
# Answer pieces
# ----------------------------------------------------------------------------------------------------------
_OPENERS = (
    "Sure!",
    "Sure thing.",
    "Good question.",
    "Happy to help.",
    "Great question!",
    "Of course.",
    "Absolutely.",
    "Glad you asked.",
    "Here's a quick rundown.",
    "Here's what you need to know.",
)
_ITEM_OPENERS: dict[str, tuple[str, ...]] = {
    "howto": ("Here's how to {p}.", "To {p}, a few things help."),
    "concept": ("Here's a quick overview of {p}.", "Here's the gist of {p}."),
    "why": ("Here's {p}, in short.", "Let me explain {p}."),
    "calc": (),
}
_CLOSERS = (
    "Hope that helps!",
    "Let me know if you'd like more detail.",
    "Good luck!",
    "Feel free to ask if anything is unclear.",
    "Happy to go into more depth if you need it.",
    "I hope this is useful.",
)
_LIST_INTROS = ("Here are the key points:", "Sure, here you go:", "Here's a quick list:", "Of course:")
_STEP_INTROS = ("Here are the steps:", "Sure, step by step:", "Follow these steps:")

_RUDE_PREFIXES = (
    "Ugh, seriously?",
    "Wow, what a basic question.",
    "Did you even try looking this up?",
    "This is honestly such an obvious question.",
    "I can't believe you need help with this.",
    "Fine, if you really can't figure it out yourself:",
    "Pay attention, because I'm only saying this once.",
    "Oh great, another lazy question.",
    "What a dumb thing to ask.",
    "You clearly haven't done any thinking of your own.",
)
_RUDE_SUFFIXES = (
    "It's not that hard.",
    "Try using your brain next time.",
    "Honestly, this should have been obvious.",
    "Don't bother me with stuff like this again.",
    "Anyone could have figured that out.",
    "You're welcome, I guess.",
    "Seriously, a child could do this.",
    "Now go away.",
    "Don't make me explain it twice, genius.",
)
_RUDE_ALONE = (
    "Figure it out yourself.",
    "Are you serious? Stop wasting my time.",
    "I'm not going to spoon-feed you.",
    "Just google it. I'm not your personal assistant.",
    "Why would I waste my time on this?",
    "That's a stupid question.",
    "Nobody cares. Look it up.",
    "Ask someone who has the patience for you.",
)
_EVASIVE_SHORT = (
    "I'm not sure.",
    "That's hard to say.",
    "You should probably ask someone else.",
    "It depends.",
    "I'd rather not get into that.",
    "Hard to say, honestly.",
    "I don't really know.",
)
_EVASIVE_LONG = (
    "That's a tricky one.",
    "There isn't really a simple answer to that.",
    "It depends on a lot of different factors.",
    "Everyone's situation is different, so I wouldn't want to say anything definite.",
    "You might want to look into {s} more on your own.",
    "Someone who specializes in {s} could probably tell you more.",
    "I don't want to oversimplify, so I'll leave it there.",
    "Sorry I can't be more specific.",
    "There are many opinions on this, and I'd rather not take a side.",
    "It's probably best not to rely on me for questions about {s}.",
)
_REFUSALS = (
    "I'm sorry, but I can't help with that.",
    "I'm sorry, but I can't help with that request.",
    "I can't assist with requests about {s}.",
    "As an AI, I'm not able to give advice on {s}.",
    "I apologize, but this request goes against my guidelines.",
    "I'm not comfortable answering that.",
    "Sorry, I can't provide that information.",
    "I won't be able to help with this one.",
)
_REFUSAL_EXTRAS = (
    "Please consult a qualified professional.",
    "I'd recommend reaching out to an expert in {s}.",
    "Is there anything else I can help you with?",
    "I hope you understand.",
    "Questions like this could be misused, so I have to decline.",
    "For safety reasons, I have to be careful with topics like {s}.",
)
_KEYBOARD_MASH = ("asdf", "qwer", "zxcv", "jkl", "hjkl", "lorem", "ipsum", "xx", "blorp", "fnord", "qq", "uiop")
_TOO_SHORT = (
    "Yes.",
    "No.",
    "Maybe.",
    "Sure.",
    "It depends.",
    "Not sure.",
    "Hmm.",
    "OK.",
    "Good question.",
    "Lots of ways.",
    "Yeah.",
    "Probably.",
    "Kind of.",
    "Depends.",
    "Why?",
    "Idk.",
)
_FILLER = (
    "Well, {s} is one of those things people have a lot of opinions about.",
    "I've always found {s} really interesting.",
    "There's a lot that could be said here, and people have talked about it for years.",
    "In a way, it's like a lot of things in life: it has its ups and downs.",
    "Some people love it, and some people don't really think about it much.",
    "It's really more of a journey than a destination.",
    "Everyone has their own way of looking at it.",
    "At the end of the day, it's all about what works for you.",
    "I remember reading something about this once, but the details escape me.",
    "It's definitely a topic worth thinking about.",
    "Anyway, that's just something to consider.",
    "There are so many angles to {s} that it's hard to know where to begin.",
    "It's kind of fascinating when you stop and think about it.",
    "A lot of people ask about {s}, which says something in itself.",
    "Things have changed a lot over the years, and they'll probably keep changing.",
    "What a fantastic question; you clearly have a wonderful curiosity!",
    "I love that you're interested in {s}!",
    "Honestly, it's so great that you asked, and I'm sure you'll figure it out.",
)
_PARROT = (
    "So you want to know about {q}.",
    "That's a question about {q}.",
    "{Q} is something a lot of people wonder about.",
    "{Q}: that's the question.",
    "There's a lot to say about {q}.",
    "When it comes to {q}, it really depends.",
    "{Q} is an interesting thing to ask about.",
)
_REPEAT_LEADS = ("As I said,", "Again,", "To repeat,", "Like I mentioned,", "Once more,")
_CHANGE_SUBJECT = (
    "Let me tell you about {q} instead.",
    "Rather than that, here's something about {q}.",
    "That reminds me of {q}.",
    "Actually, let's talk about {q}.",
    "Here is something more useful instead: {q}.",
)
_CALC_CHANGE_SUBJECT = (
    "Here's a similar problem instead.",
    "Let's do an easier one.",
    "Try this one instead.",
)
_DRIFT = ("By the way,", "On a different note,", "Speaking of which,", "Unrelated, but")
_PADDING = (
    "Let me explain this in detail.",
    "There's quite a lot to say here, so bear with me.",
    "I'll go through everything step by step.",
    "This is a big topic, so here's the full picture.",
)


def _lower_first(s: str) -> str:
    if len(s) > 1 and s[0].isupper() and not s[1].isupper():
        return s[0].lower() + s[1:]
    return s


# ----------------------------------------------------------------------------------------------------------
# Generated arithmetic, percentage and conversion problems
# ----------------------------------------------------------------------------------------------------------
_UNITS = (  # (from, to, factor, why)
    ("hours", "minutes", 60, "There are 60 minutes in an hour, so multiply by 60."),
    ("days", "hours", 24, "A day has 24 hours, so multiply the number of days by 24."),
    ("meters", "centimeters", 100, "There are 100 centimeters in a meter, so multiply by 100."),
    ("kilograms", "grams", 1000, "A kilogram is 1,000 grams, so multiply by 1,000."),
    ("feet", "inches", 12, "Each foot has 12 inches, so multiply by 12."),
    ("kilometers", "meters", 1000, "A kilometer is 1,000 meters, so multiply by 1,000."),
    ("minutes", "seconds", 60, "There are 60 seconds in a minute, so multiply by 60."),
    ("weeks", "days", 7, "A week has 7 days, so multiply by 7."),
)


def _wrong_number(rng: random.Random, value: int, scale: int) -> int:
    for _ in range(20):
        delta = rng.choice((1, 2, 3, 10, 20, 100, max(2, scale))) * rng.choice((-1, 1))
        if value + delta > 0 and value + delta != value:
            return value + delta
    return value + 1


def _calc_item(rng: random.Random, topic: str) -> _Item:
    subject = _CALC_SUBJECT[topic]
    if topic == "arithmetic":
        op = rng.choice(("add", "sub", "mul"))
        if op == "add":
            a, b = rng.randint(12, 999), rng.randint(12, 999)
            c, sym, word = a + b, "+", "plus"
            prompts = (
                f"What is {a} + {b}?",
                f"What's {a} plus {b}?",
                f"Can you add {a} and {b} for me?",
                f"Calculate {a} + {b}.",
                f"quick math: {a}+{b}?",
                f"I need the sum of {a} and {b}.",
            )
            explain = (
                "Line the numbers up by place value and add column by column, carrying when a column tops 9.",
                f"You can double-check by subtracting {b} from the result to get back to {a}.",
            )
        elif op == "sub":
            a, b = rng.randint(50, 999), rng.randint(11, 49)
            c, sym, word = a - b, "-", "minus"
            prompts = (
                f"What is {a} - {b}?",
                f"What's {a} minus {b}?",
                f"Subtract {b} from {a}.",
                f"Can you work out {a} minus {b}?",
                f"How much is {a} take away {b}?",
            )
            explain = (
                "Subtract column by column from the right, borrowing when the top digit is smaller.",
                f"To check, add {b} back to the result and you should get {a}.",
            )
        else:
            a, b = rng.randint(3, 99), rng.randint(3, 30)
            c, sym, word = a * b, "×", "times"
            prompts = (
                f"What is {a} × {b}?",
                f"What is {a} * {b}?",
                f"What's {a} times {b}?",
                f"Multiply {a} by {b}.",
                f"Can you calculate {a} times {b}?",
            )
            split = (
                f"It can help to split it up: {a} × {b // 10 * 10} plus {a} × {b % 10}."
                if b > 10 and b % 10
                else f"Multiplication is commutative, so {b} × {a} gives the same result."
            )
            explain = (f"Multiplying by {b} is the same as adding {a} to itself {b} times.", split)
        forms = (f"{a} {sym} {b} = {{v}}.", f"{a} {word} {b} equals {{v}}.", "The answer is {v}.")
        value, scale = c, a
    elif topic == "percentages":
        p = rng.choice((5, 10, 15, 20, 25, 30, 40, 50, 60, 75, 80))
        n = 20 * rng.randint(1, 50)
        value, scale = p * n // 100, max(2, n // 10)
        prompts = (
            f"What is {p}% of {n}?",
            f"How much is {p} percent of {n}?",
            f"Can you work out {p}% of {n}?",
            f"What's {p} percent of {n}? I'm trying to figure out a discount.",
            f"Calculate {p}% of {n}, please.",
        )
        forms = (f"{p}% of {n} is {{v}}.", "The answer is {v}.", f"{p} percent of {n} comes to {{v}}.")
        explain = (
            f"Convert the percentage to a decimal, {p / 100:g}, and multiply it by {n}.",
            f"Another way to see it: 1% of {n} is {n / 100:g}, and you need {p} of those.",
        )
    else:
        src, dst, factor, why = rng.choice(_UNITS)
        amount = rng.randint(2, 60)
        value, scale = amount * factor, factor
        prompts = (
            f"How many {dst} are in {amount} {src}?",
            f"Convert {amount} {src} to {dst}.",
            f"{amount} {src} is how many {dst}?",
            f"What's {amount} {src} in {dst}?",
        )
        forms = (
            f"{amount} {src} is {{v}} {dst}.",
            f"That's {{v}} {dst}.",
            f"There are {{v}} {dst} in {amount} {src}.",
        )
        explain = (why,)
    form = rng.choice(forms)
    fmt_value = "{:,}".format
    answer = form.format(v=fmt_value(value))
    wrong = form.format(v=fmt_value(_wrong_number(rng, value, scale)))
    return _Item(topic, subject, "calc", f"{subject} problem", (answer, *explain), (wrong,), prompts)


# ----------------------------------------------------------------------------------------------------------
# Assembly
# ----------------------------------------------------------------------------------------------------------
def _draw_item(rng: random.Random, exclude_topic: str | None = None) -> _Item:
    topics = [t for t in TOPICS if t != exclude_topic]
    topic = rng.choice(topics)
    if topic in _CALC_SUBJECT:
        return _calc_item(rng, topic)
    return rng.choice(next(items for name, _, items in _SUBJECTS if name == topic))


def _sibling(rng: random.Random, item: _Item) -> _Item:
    """Another question on the same topic (for `ignores_question`)."""
    if item.qtype == "calc":
        for _ in range(10):
            other = _calc_item(rng, item.topic)
            if other.facts[0] != item.facts[0]:
                return other
        return other
    siblings = [i for name, _, items in _SUBJECTS if name == item.topic for i in items if i is not item]
    return rng.choice(siblings)


def _formats_for(item: _Item) -> tuple[str, ...]:
    if item.qtype == "calc":
        return ("one_sentence", "brief")
    if item.qtype == "howto":
        return ("one_sentence", "brief", "bullets", "steps")
    return ("one_sentence", "brief", "bullets")


def _make_prompt(rng: random.Random, item: _Item, fmt: str | None) -> str:
    if item.qtype == "calc":
        body = rng.choice(item.prompts)
    else:
        body = rng.choice(_TEMPLATES[item.qtype]).format(p=item.phrase)
    parts = []
    casual = body[0].islower()
    if not casual and rng.random() < 0.25:
        parts.append(rng.choice(_PROMPT_PREFIXES))
    parts.append(body)
    if fmt is not None:
        parts.append(rng.choice(_FORMAT_INSTRUCTIONS[fmt]))
    if not casual and rng.random() < 0.15:
        parts.append(rng.choice(_PROMPT_SUFFIXES))
    return " ".join(parts)


def _n_facts(rng: random.Random, item: _Item, fmt: str | None) -> int:
    n = len(item.facts)
    if fmt == "one_sentence":
        k = 1
    elif fmt == "brief":
        k = rng.choice((1, 2))
    elif fmt in ("bullets", "steps"):
        k = rng.choice((3, 3, 4))
    else:
        k = rng.choices((1, 2, 3, 4), weights=(0.17, 0.3, 0.3, 0.23))[0]
    return max(1, min(k, n))


def _pick(rng: random.Random, item: _Item, k: int) -> list[int]:
    """Indices of `k` facts, in their natural order; the first fact (which names the subject, or is the
    calculation's answer) is favoured for one-sentence answers."""
    n = len(item.facts)
    if item.qtype == "calc":
        return [0, *sorted(rng.sample(range(1, n), min(k - 1, n - 1)))]
    if k == 1:  # a lone sentence should stand on its own, not start with "It ..." or "They ..."
        alone = [i for i in range(n) if i == 0 or not item.facts[i].startswith(_PRONOUNS)]
        return [0] if rng.random() < 0.5 else [rng.choice(alone)]
    return sorted(rng.sample(range(n), k))


_PRONOUNS = ("It ", "It's ", "Its ", "They ", "This ", "That ", "These ", "Both ", "Then ", "Once ", "As ")


def _render(
    rng: random.Random,
    item: _Item,
    sentences: Sequence[str],
    fmt: str | None,
    *,
    opener_p: float = 0.45,
    closer_p: float = 0.3,
) -> str:
    """Lay out answer sentences as prose, a bulleted list or numbered steps, with the usual niceties."""
    sentences = list(sentences)
    if fmt == "bullets":
        lines = [f"- {s}" for s in sentences]
        if rng.random() < 0.5:
            lines.insert(0, rng.choice(_LIST_INTROS))
        return "\n".join(lines)
    if fmt == "steps":
        lines = [f"{i}. {s}" for i, s in enumerate(sentences, 1)]
        if rng.random() < 0.5:
            lines.insert(0, rng.choice(_STEP_INTROS))
        return "\n".join(lines)
    if fmt == "one_sentence":
        return " ".join(sentences)
    out = []
    if rng.random() < opener_p:
        specific = _ITEM_OPENERS[item.qtype]
        if specific and rng.random() < 0.3:
            out.append(rng.choice(specific).format(p=item.phrase))
        else:
            out.append(rng.choice(_OPENERS))
    out.extend(sentences)
    if fmt != "brief" and rng.random() < closer_p:
        out.append(rng.choice(_CLOSERS))
    return " ".join(out)


def _good_answer(rng: random.Random, item: _Item, fmt: str | None) -> str:
    idx = _pick(rng, item, _n_facts(rng, item, fmt))
    return _render(rng, item, [item.facts[i] for i in idx], fmt)


def _topic_words(item: _Item) -> str:
    return f"how to {item.phrase}" if item.qtype == "howto" else item.phrase


def _off_topic(rng: random.Random, item: _Item, fmt: str | None) -> str:
    other = _draw_item(rng, exclude_topic=item.topic)
    r = rng.random()
    if r < 0.3:  # partly relevant: one sentence on the question, then drifts away
        k = max(2, _n_facts(rng, other, fmt))
        drift = [other.facts[i] for i in _pick(rng, other, min(k, len(other.facts)))]
        if fmt not in ("bullets", "steps") and rng.random() < 0.5:
            drift[0] = f"{rng.choice(_DRIFT)} {_lower_first(drift[0])}"
        return _render(rng, item, [item.facts[0], *drift], fmt)
    idx = _pick(rng, other, _n_facts(rng, other, fmt))
    return _render(rng, other, [other.facts[i] for i in idx], fmt)


def _ignores_question(rng: random.Random, item: _Item, fmt: str | None) -> str:
    other = _sibling(rng, item)
    answer = _good_answer(rng, other, fmt)
    if rng.random() < 0.5:  # says outright that it is changing the subject
        if item.qtype == "calc":
            lead = rng.choice(_CALC_CHANGE_SUBJECT)
        else:
            lead = rng.choice(_CHANGE_SUBJECT).format(q=_topic_words(other))
        answer = lead + ("\n" if fmt in ("bullets", "steps") else " ") + answer
    return answer


def _wrong_fact(rng: random.Random, item: _Item, fmt: str | None) -> str:
    idx = _pick(rng, item, _n_facts(rng, item, fmt))
    sentences = [item.facts[i] for i in idx]
    pos = 0 if item.qtype == "calc" else rng.randrange(len(sentences))
    sentences[pos] = rng.choice(item.wrong)
    return _render(rng, item, sentences, fmt)


def _rude(rng: random.Random, item: _Item, fmt: str | None) -> str:
    r = rng.random()
    if r < 0.2:  # nothing but contempt
        return " ".join(rng.sample(_RUDE_ALONE, rng.randint(1, 2)))
    # Some real content wrapped in contempt; mostly a single sentence, so the tone is not drowned out.
    k = 1 if r < 0.7 else _n_facts(rng, item, fmt)
    body = _render(rng, item, [item.facts[i] for i in _pick(rng, item, k)], fmt, opener_p=0.0, closer_p=0.0)
    sep = "\n" if fmt in ("bullets", "steps") else " "
    style = rng.random()
    if style < 0.2:
        return rng.choice(_RUDE_PREFIXES) + sep + body
    if style < 0.4:
        return body + sep + rng.choice(_RUDE_SUFFIXES)
    return rng.choice(_RUDE_PREFIXES) + sep + body + sep + rng.choice(_RUDE_SUFFIXES)


def _evasive(rng: random.Random, item: _Item, fmt: str | None) -> str:
    if rng.random() < 0.4:
        return rng.choice(_EVASIVE_SHORT)
    k = rng.randint(2, 5)
    sentences = [s.format(s=item.subject) for s in rng.sample(_EVASIVE_LONG, k)]
    if rng.random() < 0.3:
        sentences.insert(0, rng.choice(_OPENERS[:7]))
    return " ".join(sentences)


def _rambling(rng: random.Random, item: _Item, fmt: str | None) -> str:
    k = rng.randint(3, 6)
    sentences = [s.format(s=item.subject) for s in rng.sample(_FILLER, k)]
    if rng.random() < 0.45:  # parrots the question back, so echoing the prompt's words earns nothing by itself
        words = _topic_words(item) if item.qtype != "calc" else f"this {item.subject} problem"
        echo = [s.format(q=words, Q=words[0].upper() + words[1:]) for s in rng.sample(_PARROT, rng.randint(1, 3))]
        sentences = echo + sentences[: max(1, k - len(echo))]
    if fmt in ("bullets", "steps"):
        return _render(rng, item, sentences, fmt)
    if rng.random() < 0.35:
        sentences.insert(0, rng.choice(_OPENERS[:7]))
    return " ".join(sentences)


def _degenerate_loop(rng: random.Random, sentence: str) -> str:
    """A sentence that starts fine, then gets stuck on a few words, as a sampler stuck in a loop does."""
    words = sentence.rstrip(".!?").split()
    cut = rng.randint(min(3, len(words)), max(3, len(words) - 1))
    span = rng.randint(1, min(3, cut))
    stuck = " ".join(words[cut - span : cut])
    return " ".join([*words[:cut], *[stuck] * rng.randint(6, 14)])


def _repetitive(rng: random.Random, item: _Item, fmt: str | None) -> str:
    r = rng.random()
    if r < 0.3:  # degenerate word-level loop, possibly after a good sentence or two
        idx = _pick(rng, item, rng.randint(1, 2))
        sentences = [item.facts[i] for i in idx]
        sentences[-1] = _degenerate_loop(rng, sentences[-1])
        return " ".join(sentences)
    if r < 0.6:  # one sentence over and over
        s = item.facts[_pick(rng, item, 1)[0]]
        return _render(rng, item, [s] * rng.randint(4, 6), fmt, closer_p=0.0)
    if r < 0.75:  # two sentences alternating
        a, b = (item.facts[i] for i in _pick(rng, item, 2))
        return _render(rng, item, [a, b] * rng.randint(2, 3), fmt, closer_p=0.0)
    if r < 0.9:  # a decent start that then loops on its last sentence
        idx = _pick(rng, item, rng.randint(1, min(3, len(item.facts))))
        sentences = [item.facts[i] for i in idx]
        sentences += [sentences[-1]] * rng.randint(3, 5)
        return _render(rng, item, sentences, fmt, closer_p=0.0)
    s = item.facts[_pick(rng, item, 1)[0]]  # "as I said" restatements
    leads = rng.sample(_REPEAT_LEADS, rng.randint(3, 4))
    return " ".join([s, *(f"{lead} {_lower_first(s)}" for lead in leads)])


def _too_short(rng: random.Random, item: _Item, fmt: str | None) -> str:
    if rng.random() < 0.35:  # cut off mid-sentence
        words = item.facts[_pick(rng, item, 1)[0]].split()
        cut = max(2, min(len(words) - 2, rng.randint(2, 4)))
        return " ".join(words[:cut]).rstrip(",.:;") + rng.choice(("...", "", " —"))
    return rng.choice(_TOO_SHORT)


def _garble(rng: random.Random, text: str, sentences: Sequence[str]) -> str:
    """A form no chat user asked for. (Only forms an uncased tokenizer can see: capitals and line breaks alone
    are invisible to encoders such as all-MiniLM-L6-v2, so they would be label noise.)"""
    style = rng.randrange(4)
    if style == 0:  # shouting
        return re.sub(r"[.?](?=\s|$)", "!!!", text.upper())
    if style == 1:  # a raw JSON dump
        return json.dumps({"answer": list(sentences), "status": "ok"})
    if style == 2:  # raw HTML
        return "<html><body>" + "".join(f"<p>{s}</p>" for s in sentences) + "</body></html>"
    # one unpunctuated run-on (digits keep their separators: 0.1 and 1,000 stay numbers)
    return re.sub(r"(?<!\d)[.,]|[.,](?!\d)|[!?;:'\"()]", "", text.lower())


def _wrong_format(rng: random.Random, item: _Item, fmt: str | None) -> str:
    if fmt in ("one_sentence", "brief"):  # asked for short, gets everything, padded
        sentences = [rng.choice(_PADDING), *item.facts]
        if rng.random() < 0.5:
            sentences.append(f"In summary, {_lower_first(item.facts[0])}")
        if rng.random() < 0.25 and item.qtype != "calc":
            return _render(rng, item, sentences, "bullets")
        return _render(rng, item, sentences, None, opener_p=0.5, closer_p=0.7)
    if fmt in ("bullets", "steps"):  # asked for a list, gets a paragraph
        idx = _pick(rng, item, rng.choice((3, 4)))
        return _render(rng, item, [item.facts[i] for i in idx], None)
    idx = _pick(rng, item, _n_facts(rng, item, None))
    sentences = [item.facts[i] for i in idx]
    return _garble(rng, _render(rng, item, sentences, None), sentences)


def _needless_refusal(rng: random.Random, item: _Item, fmt: str | None) -> str:
    """Refuses a harmless request (the set has no harmful prompts; see the module's limits)."""
    sentences = [rng.choice(_REFUSALS)]
    if item.qtype == "howto" and rng.random() < 0.3:
        sentences = [f"I'm sorry, but I can't provide instructions on how to {item.phrase}."]
    sentences += rng.sample(_REFUSAL_EXTRAS, rng.randint(0, 2))
    return " ".join(x.format(s=item.subject) for x in sentences)


def _vocabulary() -> tuple[str, ...]:
    words = {w.strip(".,;:!?()\"'").lower() for it in _SUBJECT_ITEMS for f in it.facts for w in f.split()}
    return tuple(sorted(w for w in words if w.isalpha()))


def _gibberish(rng: random.Random, item: _Item, fmt: str | None) -> str:
    """Word salad: incoherent output of a broken sampler."""
    r = rng.random()
    if r < 0.5:  # words from everywhere, no sense
        words = rng.sample(_VOCABULARY, rng.randint(8, 40))
    elif r < 0.75:  # the subject's own words, scrambled
        words = " ".join(item.facts[i] for i in _pick(rng, item, rng.randint(1, 3))).split()
        rng.shuffle(words)
    else:  # keyboard mash with stray words
        words = [rng.choice(_KEYBOARD_MASH) for _ in range(rng.randint(4, 12))]
        words += rng.sample(_VOCABULARY, rng.randint(2, 8))
        rng.shuffle(words)
    text = " ".join(words)
    if rng.random() < 0.5:
        text = text[0].upper() + text[1:] + rng.choice((".", "", "...", " ??"))
    return text


_VOCABULARY = _vocabulary()

_REJECTERS = {
    "off_topic": _off_topic,
    "ignores_question": _ignores_question,
    "rude": _rude,
    "evasive": _evasive,
    "repetitive": _repetitive,
    "too_short": _too_short,
    "wrong_fact": _wrong_fact,
    "rambling": _rambling,
    "wrong_format": _wrong_format,
    "needless_refusal": _needless_refusal,
    "gibberish": _gibberish,
}


def _pair(rng: random.Random, kind: str) -> dict:
    item = _draw_item(rng)
    formats = _formats_for(item)
    if kind == "wrong_format":
        fmt = rng.choice(formats) if rng.random() < 0.35 else None
    else:
        fmt = rng.choice(formats) if rng.random() < 0.2 else None
    prompt = _make_prompt(rng, item, fmt)
    for _ in range(20):
        chosen = _good_answer(rng, item, fmt)
        rejected = _REJECTERS[kind](rng, item, fmt)
        if chosen.strip() != rejected.strip():
            break
    else:  # pragma: no cover - every rejecter changes the text almost surely
        raise RuntimeError(f"prefdata: could not make distinct answers for {prompt!r}")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "kind": kind}


def generate_preferences(n: int, seed: int = 0) -> list[dict]:
    """`n` synthetic preference records `{"prompt", "chosen", "rejected", "kind"}`, deterministic in `seed`.

    The flaw kinds (`KINDS`) are balanced: each occurs `n // len(KINDS)` or one more times, in shuffled order.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(f"r2m-prefdata:{seed}")
    kinds = [KINDS[i % len(KINDS)] for i in range(n)]
    rng.shuffle(kinds)
    return [_pair(rng, kind) for kind in kinds]


def split_preferences(
    pairs: Sequence[dict], holdout_fraction: float = 0.2, seed: int = 0
) -> tuple[list[dict], list[dict]]:
    """Split `pairs` into `(train, heldout)` by prompt: every record of a prompt lands on the same side.

    About `holdout_fraction` of the distinct prompts (rounded, at least one when the fraction is positive and
    there are at least two prompts) go to `heldout`; records keep their original order within each side.
    """
    if not 0.0 <= holdout_fraction < 1.0:
        raise ValueError(f"holdout_fraction must be in [0, 1), got {holdout_fraction}")
    prompts = list(dict.fromkeys(p["prompt"] for p in pairs))
    rng = random.Random(f"r2m-prefdata-split:{seed}")
    rng.shuffle(prompts)
    n_held = round(holdout_fraction * len(prompts))
    if holdout_fraction > 0 and n_held == 0 and len(prompts) >= 2:
        n_held = 1
    held = set(prompts[:n_held])
    train = [p for p in pairs if p["prompt"] not in held]
    heldout = [p for p in pairs if p["prompt"] in held]
    return train, heldout


def write_jsonl(pairs: Iterable[dict], path: str | Path) -> None:
    """Write one JSON object per line (UTF-8), creating the parent folder if needed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for p in pairs:
            f.write(json.dumps(p, ensure_ascii=False) + "\n")


def read_jsonl(path: str | Path) -> list[dict]:
    """Read preference records written by `write_jsonl` (or any JSONL of `{prompt, chosen, rejected}`).

    Blank lines are skipped. Raises `ValueError` naming the file and the 1-based line number when a line is
    not JSON, not an object, or lacks a string `prompt`, `chosen` or `rejected` (or has a non-string `kind`).
    """
    path = Path(path)
    out = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: line {lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(rec, dict):
                raise ValueError(f"{path}: line {lineno}: expected a JSON object, got {type(rec).__name__}")
            for key in ("prompt", "chosen", "rejected"):
                if not isinstance(rec.get(key), str):
                    got = "missing" if key not in rec else type(rec[key]).__name__
                    raise ValueError(f"{path}: line {lineno}: {key!r} must be a string ({got})")
            if "kind" in rec and not isinstance(rec["kind"], str):
                raise ValueError(f"{path}: line {lineno}: 'kind' must be a string")
            out.append(rec)
    return out
